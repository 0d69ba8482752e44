//! A walk's end looks only at the records that can have started to match a reminder rule
//! since its last pass (written since, or crossed an `older_than` threshold since), and at
//! the whole table when the rule's conditions change or its last full pass is a day old.
//! These tests try the records such a narrower pass could miss.

use crate::helpers::{TestApp, spawn_app_with, stderr};

async fn run(app: &TestApp) {
    let out = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Runs `statement` as the test's own session (time passing, another writer, an operator).
async fn sql(app: &TestApp, statement: &str) {
    sqlx::query(statement).execute(&app.pool).await.unwrap();
}

/// [`sql`] with the invoice's id as `$1`.
async fn sql_for(app: &TestApp, statement: &str, invoice: &str) {
    sqlx::query(statement)
        .bind(invoice)
        .execute(&app.pool)
        .await
        .unwrap();
}

async fn has_reminder(app: &TestApp, source_id: &str) -> bool {
    app.count(&format!(
        "SELECT count(*) FROM idem_ledger WHERE rule = 'overdue_reminder' AND source_id = '{source_id}'"
    ))
    .await
        == 1
}

/// (last full pass, what the last pass covers from) of the demo's reminder rule.
async fn passes(app: &TestApp) -> (String, String) {
    sqlx::query_as(
        "SELECT full_at::text, covers_from::text FROM idem_rule_passes WHERE rule = 'overdue_reminder'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// An open invoice of the import that has no reminder yet (not overdue).
async fn open_without_reminder(app: &TestApp) -> String {
    sqlx::query_scalar(
        "SELECT source_id FROM demo_invoices t WHERE status = 'open'
           AND NOT EXISTS (SELECT 1 FROM idem_ledger l WHERE l.source_id = t.source_id)
         ORDER BY source_id LIMIT 1",
    )
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .expect("the seed should have open invoices that are not overdue yet")
}

/// The demo imported once (its walk's end recorded the rule's first, full pass), and an
/// open invoice without a reminder.
async fn imported_with_an_invoice_not_yet_due() -> (TestApp, String) {
    let app = spawn_app_with(60, "").await;
    run(&app).await;
    let invoice = open_without_reminder(&app).await;
    (app, invoice)
}

#[tokio::test]
async fn an_invoice_that_falls_overdue_without_changing_still_gets_its_reminder() {
    let (app, invoice) = imported_with_an_invoice_not_yet_due().await;

    // Three hours pass: the import and its pass move three hours back. The invoice fell
    // due 3 days and an hour ago, so it crossed the rule's 3 days an hour ago, after the
    // pass; nothing about it changed at the vendor.
    sql(
        &app,
        "UPDATE idem_rule_passes SET covers_from = covers_from - interval '3 hours',
                                     full_at = full_at - interval '3 hours'",
    )
    .await;
    sql(
        &app,
        "UPDATE demo_invoices SET last_changed_at = last_changed_at - interval '3 hours'",
    )
    .await;
    sql_for(
        &app,
        "UPDATE demo_invoices SET due_date = now() - interval '3 days 1 hour' WHERE source_id = $1",
        &invoice,
    )
    .await;
    let (first_full, _) = passes(&app).await;
    run(&app).await;

    assert!(
        has_reminder(&app, &invoice).await,
        "the invoice that crossed its threshold since the last pass got no reminder"
    );
    let (full, last) = passes(&app).await;
    assert_eq!(
        full, first_full,
        "the second walk's end was not the narrower pass"
    );
    assert!(
        last > full,
        "the second pass was not recorded: {last} <= {full}"
    );
}

#[tokio::test]
async fn a_record_the_narrow_pass_cannot_see_is_reminded_by_the_daily_full_pass() {
    let (app, invoice) = imported_with_an_invoice_not_yet_due().await;

    // A record that matches without having crossed anything since the last pass (here its
    // due date was moved far back by hand; in life, a ledger row deleted by hand).
    sql_for(
        &app,
        "UPDATE demo_invoices SET due_date = now() - interval '30 days' WHERE source_id = $1",
        &invoice,
    )
    .await;
    run(&app).await;
    assert!(
        !has_reminder(&app, &invoice).await,
        "the narrow pass looked at a record it had no reason to look at (is it a full pass?)"
    );

    // A day after the last full pass, a walk's end looks at the whole table again.
    sql(
        &app,
        "UPDATE idem_rule_passes SET full_at = full_at - interval '25 hours'",
    )
    .await;
    run(&app).await;
    assert!(
        has_reminder(&app, &invoice).await,
        "the daily full pass did not remind the record"
    );
}

#[tokio::test]
async fn changing_a_rules_conditions_looks_at_the_whole_table_again() {
    let app = spawn_app_with(60, "").await;
    run(&app).await;
    let overdue_paid = app
        .count(
            "SELECT count(*) FROM demo_invoices WHERE status = 'paid' AND due_date < now() - interval '3 days'",
        )
        .await;
    assert!(
        overdue_paid > 0,
        "the seed should have paid invoices past their due date"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger l JOIN demo_invoices t USING (source_id) WHERE t.status = 'paid'")
            .await,
        0
    );

    // The same rule now reminds paid invoices instead of open ones; no invoice changed.
    let connector = app.demo_connector_variant("demo_billing", |text| {
        text.replace(
            r#"{ column = "status", eq = "open" },"#,
            r#"{ column = "status", eq = "paid" },"#,
        )
    });
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = [{:?}]\n",
            connector.file.display().to_string()
        ),
    )
    .unwrap();
    run(&app).await;

    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger l JOIN demo_invoices t USING (source_id) WHERE t.status = 'paid'")
            .await,
        overdue_paid,
        "records that match only the changed conditions got no reminder"
    );
}

#[tokio::test]
async fn an_invoice_written_by_another_stream_is_looked_at_by_the_rules_stream() {
    let (app, invoice) = imported_with_an_invoice_not_yet_due().await;
    // Another stream writes the rule's table without the rule (an events stream beside
    // its backfill): its page transaction stamps the row it changes with its start.
    sql_for(
        &app,
        "UPDATE demo_invoices SET due_date = now() - interval '30 days', last_changed_at = now()
         WHERE source_id = $1",
        &invoice,
    )
    .await;
    run(&app).await;
    assert!(
        has_reminder(&app, &invoice).await,
        "a record written since the last pass was not looked at"
    );
}

#[tokio::test]
async fn a_write_committed_after_the_pass_that_could_not_see_it_is_looked_at_next_time() {
    let (app, invoice) = imported_with_an_invoice_not_yet_due().await;

    // Another writer's page transaction is open across the next walk's end: the pass
    // cannot see its row, which is stamped with the transaction's start, before the pass.
    let mut other = app.pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *other).await.unwrap();
    sqlx::query(
        "UPDATE demo_invoices SET due_date = now() - interval '30 days', last_changed_at = now()
         WHERE source_id = $1",
    )
    .bind(&invoice)
    .execute(&mut *other)
    .await
    .unwrap();
    run(&app).await;
    assert!(
        !has_reminder(&app, &invoice).await,
        "the pass saw an uncommitted write"
    );
    sqlx::query("COMMIT").execute(&mut *other).await.unwrap();
    drop(other);

    run(&app).await;
    assert!(
        has_reminder(&app, &invoice).await,
        "a write committed after the pass that could not see it was never looked at"
    );
}

#[tokio::test]
async fn a_role_that_cannot_see_other_sessions_looks_a_day_back() {
    // idem running as a role without `pg_read_all_stats` sees NULL for other roles'
    // transaction starts, so it cannot know how old their open transactions are.
    let (app, _) = imported_with_an_invoice_not_yet_due().await;
    let mut tables = app.idem_tables(&[]).await;
    tables.push("demo_invoices".into());
    let role = app
        .role_with(
            "idem_limited",
            &[
                format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {{role}}",
                    tables.join(", ")
                ),
                "GRANT SELECT ON _sqlx_migrations TO {role}".into(),
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}".into(),
            ],
        )
        .await;
    // Another role's session is in a transaction while the limited role's walk ends.
    let mut other = app.pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *other).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *other).await.unwrap();
    let out = app
        .command(&["run", "--no-notify"])
        .env("DATABASE_URL", &role.url)
        .output()
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut *other).await.unwrap();
    drop(other);
    let looks_back_hours: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - covers_from)::float8 / 3600 FROM idem_rule_passes",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    role.drop_role(&app).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        looks_back_hours > 23.0,
        "the next pass looks only {looks_back_hours:.2} h back, though this role could not see when the other session's transaction started"
    );
}

#[tokio::test]
async fn a_record_idem_rewrites_is_stamped_after_the_pass_before_it() {
    // What the narrow pass relies on: every write of a destination row by any stream sets
    // `last_changed_at` to its transaction's start, after the previous pass's instant.
    let (app, invoice) = imported_with_an_invoice_not_yet_due().await;
    let (_, covers_from) = passes(&app).await;
    app.vendor
        .update_invoice(&invoice, |inv| inv["amount_due"] = serde_json::json!(4242));
    run(&app).await;
    let stamped_after: bool = sqlx::query_scalar(
        "SELECT last_changed_at >= CAST($1 AS timestamptz) FROM demo_invoices WHERE source_id = $2",
    )
    .bind(&covers_from)
    .bind(&invoice)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        stamped_after,
        "the rewritten row's last_changed_at is before the pass it follows"
    );
}

#[tokio::test]
async fn an_invoice_that_falls_overdue_while_its_import_still_walks_is_reminded_at_the_walks_end() {
    // A threshold a record can cross within one walk: five seconds.
    let app = spawn_app_with(500, "").await;
    let connector = app.demo_connector_variant("five_seconds_overdue", |text| {
        text.replace("older_than = \"3d\"", "older_than = \"5s\"")
    });
    // The first page's first invoice falls due now: its page transaction finds it not yet
    // overdue, and the walk's end (the later pages are slow) finds it overdue. The walk's
    // end skips what this run's page transactions matched, except what crossed a
    // threshold since the run began.
    let invoice = app.vendor.invoices()[0]["id"].as_str().unwrap().to_string();
    let now = chrono::Utc::now().timestamp();
    app.vendor.update_invoice(&invoice, |i| {
        i["status"] = serde_json::json!("open");
        i["due_date"] = serde_json::json!(now);
    });
    // Five pages of 100; the four after the first take 2 s each.
    for nth in 2..=5 {
        app.vendor.inject_at(
            nth,
            idem_fakes::Fault::new(
                "/v1/invoices",
                1,
                idem_fakes::FaultKind::Delay(std::time::Duration::from_millis(2000)),
            ),
        );
    }
    let report = app
        .run_connector(&connector, "invoices", idem::run::Mode::Regular, false)
        .await;
    assert_eq!(report.counters.inserted, 500, "{report:?}");
    assert_eq!(report.counters.pages, 5, "{report:?}");

    assert!(
        has_reminder(&app, &invoice).await,
        "the invoice that fell overdue during its own import got no reminder"
    );
    let made_after_its_page: bool = sqlx::query_scalar(
        "SELECT l.created_at > t.last_changed_at FROM idem_ledger l
         JOIN demo_invoices t ON t.source_id = l.source_id WHERE l.source_id = $1",
    )
    .bind(&invoice)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        made_after_its_page,
        "the reminder was made with the invoice's page, so this test did not try the walk's end"
    );
}

#[tokio::test]
async fn invoices_stored_by_retrying_their_failures_are_reminded_in_that_run() {
    let app = spawn_app_with(60, "").await;
    // A broken mapping fails every invoice (an email is no amount); the shipped one, the
    // same table, reads them. The second run stores them from the failures table before
    // it walks: its walk reads none of them again (nothing changed at the vendor), so
    // only the retry's own transaction can match them.
    let broken = app.demo_connector_variant("broken_amount", |text| {
        text.replace("pointer = \"/amount_due\"", "pointer = \"/customer_email\"")
    });
    let failed = app
        .run_connector(&broken, "invoices", idem::run::Mode::Regular, false)
        .await;
    assert_eq!(failed.counters.failed, 60, "{failed:?}");
    assert_eq!(app.count("SELECT count(*) FROM idem_ledger").await, 0);

    let fixed = app
        .run_connector(
            &app.connector(),
            "invoices",
            idem::run::Mode::Regular,
            false,
        )
        .await;
    assert_eq!(fixed.status, idem::run::RunStatus::Succeeded, "{fixed:?}");
    assert_eq!(app.count("SELECT count(*) FROM demo_invoices").await, 60);
    assert_eq!(app.count("SELECT count(*) FROM idem_failures").await, 0);
    let overdue = app
        .count(
            "SELECT count(*) FROM demo_invoices
             WHERE status = 'open' AND due_date < now() - interval '3 days'",
        )
        .await;
    assert!(overdue > 0, "the seed has overdue invoices");
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger WHERE rule = 'overdue_reminder'")
            .await,
        overdue,
        "an invoice stored by the retry of its failure got no reminder"
    );
}

#[tokio::test]
async fn a_record_written_twice_in_one_transaction_is_reminded_from_its_last_copy() {
    let app = spawn_app_with(1100, "").await;
    // The invoices through a next-URL list of 100 a page: the 1,000th invoice closes
    // page 10, which completes the transaction's first 1,000-row chunk.
    let connector = app.demo_connector_variant("next_url_list", |text| {
        text.replacen(
            "path = \"/v1/invoices\"\nparams = { limit = \"100\" }\nrecords = \"/data\"",
            "path = \"/paged/next_url\"\nparams = { per_page = \"100\" }\nrecords = \"/items\"",
            1,
        )
        .replacen(
            "kind = \"last_record\"\nparam = \"starting_after\"\nhas_more = \"/has_more\"",
            "kind = \"next_url\"\npointer = \"/next\"",
            1,
        )
    });
    let invoice = app.vendor.invoices()[999]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let long_ago = chrono::Utc::now().timestamp() - 30 * 86_400;
    app.vendor.update_invoice(&invoice, |i| {
        i["status"] = serde_json::json!("open");
        i["due_date"] = serde_json::json!(long_ago);
        i["amount_due"] = serde_json::json!(1111);
    });
    // Before page 11 is served the invoice changes, and page 11 starts with it again (as
    // a list that shifted would serve it): its second copy lands in the second chunk.
    let changed = invoice.clone();
    app.vendor.on_request(11, move |data| {
        data.update_invoice(&changed, |i| i["amount_due"] = serde_json::json!(4242));
    });
    app.vendor.inject_at(
        11,
        idem_fakes::Fault::new(
            "/paged/next_url",
            1,
            idem_fakes::FaultKind::DuplicateRecords,
        ),
    );
    // One transaction for the whole walk, however slow the machine.
    let one_transaction = idem::run::RunOptions {
        batching: idem::writer::Batching {
            max_wait: std::time::Duration::from_secs(600),
            ..Default::default()
        },
        ..idem::run::RunOptions::new(idem::run::Mode::Regular, false)
    };
    let report = app
        .run_connector_with(&connector, "invoices", &one_transaction)
        .await;
    assert_eq!(report.status, idem::run::RunStatus::Succeeded, "{report:?}");
    assert_eq!(report.counters.fetched, 1101, "{report:?}");
    assert_eq!(report.counters.pages, 11, "{report:?}");

    let bodies: Vec<String> = sqlx::query_scalar(
        "SELECT body FROM idem_ledger WHERE rule = 'overdue_reminder' AND source_id = $1",
    )
    .bind(&invoice)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(
        bodies[0].contains("42.42") && !bodies[0].contains("11.11"),
        "the reminder was rendered from the first copy: {}",
        bodies[0]
    );
}
