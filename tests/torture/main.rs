//! Crash, restart and race torture of the real `idem` binary (driven by
//! `scripts/torture.sh`, which builds the release binary, starts a Postgres cluster of its
//! own and sets `IDEM_TORTURE`; without it every test here returns at once).
//!
//! Each mode checks, after every step, that the committed checkpoint is never ahead of the
//! committed data and that no ledger key got two emails; when a run completes, that the
//! tables equal the vendor's truth and that every ledger key got its one email.

mod world;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idem_fakes::{Fault, FaultKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use world::{Cfg, Shape, World, sigkill, sigterm, tail};

/// A known-bug switch: `IDEM_TORTURE_<NAME>=1` turns a scenario on that fails until the fix
/// is merged (see docs/TESTING.md).
fn switch(name: &str) -> bool {
    std::env::var(format!("IDEM_TORTURE_{name}")).is_ok_and(|v| v == "1")
}

/// Known bug (HubSpot-shaped search by offsets): a record changed during a walk (or while
/// an interrupted walk waits to resume) moves to the end of the ascending sort, every later
/// record shifts one offset back, one is skipped and the mark passes it. Off until the fix
/// is merged: the search shape's records then change only between walks.
fn search_offset_shift() -> bool {
    switch("SEARCH_OFFSET_SHIFT")
}

/// Shapes whose vendor changes records in the middle of a walk during the random kills.
fn walk_mutation_shapes() -> Vec<Shape> {
    let mut shapes = vec![Shape::List, Shape::Events];
    if search_offset_shift() {
        shapes.push(Shape::Search);
    }
    shapes
}

fn rng_for(cfg: &Cfg, salt: u64) -> StdRng {
    StdRng::seed_from_u64(cfg.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

const REPLAY: [&str; 5] = [
    "--from",
    "2020-01-01T00:00:00Z",
    "--to",
    "2030-01-01T00:00:00Z",
    "--no-notify",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_every_commit_boundary() {
    let Some(cfg) = world::cfg("torture_every_commit_boundary") else {
        return;
    };
    let mut rng = rng_for(&cfg, 1);
    let world = World::new(&cfg, &mut rng).await;
    let started = Instant::now();
    let mut points: Vec<String> = Vec::new();
    for k in 1..=world::RECORDS / world::PAGE {
        points.push(format!("page_before_commit:{k}"));
        points.push(format!("page_after_commit:{k}"));
        // Inside one multi-page transaction (the default batching): page k written,
        // nothing of it committed yet.
        points.push(format!("page_written:{k}"));
    }
    for p in [
        "walk_end_before_commit:1",
        "walk_end_after_commit:1",
        "run_after_finish:1",
    ] {
        points.push(p.into());
    }
    let mut summary = Vec::new();
    for shape in Shape::ALL {
        let config = world.config(shape);
        let target = shape.target();
        let (mut hit, mut missed) = (0, Vec::new());
        for point in &points {
            world.reset(shape).await;
            let mut run = world.idem(&config, &["run", &target, "--no-notify"], Some(point));
            if !point.starts_with("page_written") {
                // One page per transaction, so every page has its own commit boundary.
                run.env("IDEM__IMPORT__TRANSACTION_RECORDS", "1");
            }
            let (status, stderr) = world.finish(run).await;
            if status.signal() == Some(libc::SIGKILL) {
                hit += 1;
            } else if status.success() {
                missed.push(point.clone());
            } else {
                cfg.violation(format!(
                    "{target} with IDEM_CRASH_AT={point}: the run failed instead of crashing: {}",
                    tail(&stderr)
                ));
            }
            cfg.check(
                world
                    .check_not_ahead(shape)
                    .await
                    .map_err(|e| format!("after a kill at {point}: {e}")),
            );
            world.converge(&cfg, shape).await;
            cfg.check(
                world
                    .check_converged(shape)
                    .await
                    .map_err(|e| format!("after a kill at {point} and a resumed run: {e}")),
            );
            cfg.check(world.check_not_ahead(shape).await);
        }
        // Every page boundary of a 30-page walk and every end-of-walk boundary exists.
        if !missed.is_empty() {
            cfg.violation(format!(
                "{target}: these crash points were never reached in a 30-page run: {missed:?}"
            ));
        }
        // The dispatcher's boundaries: before and after each of the first sends.
        let mut dispatch_hit = 0;
        if shape.has_ledger() {
            let rows = world.ledger(shape).await.len();
            for k in 1..=rows.min(8) as u64 {
                for point in [
                    format!("notify_before_send:{k}"),
                    format!("notify_after_send:{k}"),
                ] {
                    let (status, _) = world
                        .finish(world.idem(&config, &["notify"], Some(&point)))
                        .await;
                    if status.signal() == Some(libc::SIGKILL) {
                        dispatch_hit += 1;
                    }
                    cfg.check(world.check_ledger_so_far(shape).await);
                }
            }
            // Rows in flight in a killed dispatcher wait for their lease (2s) to expire.
            tokio::time::sleep(Duration::from_millis(2200)).await;
        }
        world.drain_ledger(&cfg, shape).await;
        let (expected, sent, review) = match world.check_ledger_final(shape).await {
            Ok(v) => v,
            Err(e) => cfg.violation(e),
        };
        summary.push(format!(
            "  {target:16} boundaries hit {hit}/{} (import), {dispatch_hit} (dispatch); emails expected {expected}, sent {sent}, needs_review {review}, duplicated 0",
            points.len()
        ));
    }
    eprintln!(
        "every_commit_boundary: OK in {:.0}s\n{}",
        started.elapsed().as_secs_f64(),
        summary.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_random_kills() {
    let Some(cfg) = world::cfg("torture_random_kills") else {
        return;
    };
    let mut rng = rng_for(&cfg, 2);
    let world = World::new(&cfg, &mut rng).await;
    let started = Instant::now();
    let walk_mutations = walk_mutation_shapes();
    let mut summary = Vec::new();
    for shape in Shape::ALL {
        let config = world.config(shape);
        let target = shape.target();
        // A full run's duration bounds the random kill moments.
        let t0 = Instant::now();
        world.converge(&cfg, shape).await;
        let full = t0.elapsed().max(Duration::from_millis(100));
        let (mut landed, mut changes) = (0usize, 0usize);
        let mut by_action: BTreeMap<&str, usize> = BTreeMap::new();
        let mut typical: BTreeMap<&str, Duration> = BTreeMap::new();
        // Kills that land: a kill after the command ended does not count, so keep going
        // (up to three times as many attempts) until `kills` have landed.
        let mut attempts = 0;
        while landed < cfg.kills && attempts < 3 * cfg.kills {
            let i = attempts;
            attempts += 1;
            let walk_waits = world.walk_in_progress(shape).await;
            if rng.random_bool(0.3)
                && (shape != Shape::Search || !walk_waits || search_offset_shift())
            {
                changes += world.mutate(shape, &mut rng);
            }
            if walk_mutations.contains(&shape) && rng.random_bool(0.3) {
                world.mutate_during_walk(shape, &mut rng);
            }
            // A fresh walk now and then, so that kills land everywhere in long walks too.
            if rng.random_bool(0.05) {
                world.reset(shape).await;
            }
            let roll: f64 = rng.random();
            let (action, args): (&str, Vec<&str>) = if shape.has_ledger() && roll < 0.2 {
                ("dispatch", vec!["notify"])
            } else if shape.replayable() && roll < 0.4 {
                let mut a = vec!["replay", target.as_str()];
                a.extend(REPLAY);
                ("replay", a)
            } else {
                ("import", vec!["run", target.as_str()])
            };
            // Each action's kill moment is drawn within its last observed duration, so
            // that kills land in short incremental runs as well as in long walks.
            let estimate = *typical.entry(action).or_insert(full);
            let wait = estimate.mul_f64(rng.random_range(0.0..1.1));
            let mut child = world.spawn(world.idem(&config, &args, None));
            let spawned = Instant::now();
            while spawned.elapsed() < wait {
                if let Ok(Some(_)) = child.try_wait() {
                    let took = spawned.elapsed().max(Duration::from_millis(20));
                    typical.insert(action, took);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if sigkill(&mut child).await {
                landed += 1;
                *by_action.entry(action).or_default() += 1;
            }
            let step = format!("after kill {i} ({action} at {}ms)", wait.as_millis());
            cfg.check(
                world
                    .check_not_ahead(shape)
                    .await
                    .map_err(|e| format!("{step}: {e}")),
            );
            cfg.check(
                world
                    .check_ledger_so_far(shape)
                    .await
                    .map_err(|e| format!("{step}: {e}")),
            );
        }
        if landed < cfg.kills {
            cfg.violation(format!(
                "{target}: only {landed} of {} kills landed in {attempts} attempts",
                cfg.kills
            ));
        }
        // Walks that run to their end while the vendor changes records under them: the
        // checkpoint they commit must still claim only what is stored.
        let mut changed_walks = 0;
        if walk_mutations.contains(&shape) {
            for w in 0..(cfg.kills / 10).max(3) {
                world.reset(shape).await;
                for _ in 0..rng.random_range(1..=3) {
                    world.mutate_during_walk(shape, &mut rng);
                }
                world.converge(&cfg, shape).await;
                changed_walks += 1;
                cfg.check(
                    world
                        .check_not_ahead(shape)
                        .await
                        .map_err(|e| format!("after fresh walk {w} with changes during it: {e}")),
                );
            }
        }
        world.converge(&cfg, shape).await;
        // A resumed walk started before the last changes; one more run sees them.
        world.converge(&cfg, shape).await;
        cfg.check(world.check_converged(shape).await);
        cfg.check(world.check_not_ahead(shape).await);
        tokio::time::sleep(Duration::from_millis(2200)).await;
        world.drain_ledger(&cfg, shape).await;
        let (expected, sent, review) = match world.check_ledger_final(shape).await {
            Ok(v) => v,
            Err(e) => cfg.violation(e),
        };
        eprintln!(
            "  {target:16} kills landed {landed} of {attempts} attempts, {:.0}s",
            started.elapsed().as_secs_f64()
        );
        summary.push(format!(
            "  {target:16} kills landed {landed} of {attempts} attempts {by_action:?}; vendor changes {changes}; walks changed under them {changed_walks}; records {}; emails expected {expected}, sent {sent}, needs_review {review}, duplicated 0",
            world.truth(shape).len()
        ));
    }
    eprintln!(
        "random_kills: OK in {:.0}s (walk mutations on: {walk_mutations:?})\n{}",
        started.elapsed().as_secs_f64(),
        summary.join("\n")
    );
}

/// What a failing command must say: an error line naming the database side.
fn clear_error(stderr: &str) -> bool {
    let s = stderr.to_lowercase();
    s.contains("error")
        && [
            "database",
            "postgres",
            "connection",
            "commit",
            "terminat",
            "pool",
        ]
        .iter()
        .any(|w| s.contains(w))
}

/// The `error` field of the last JSON log line that has one.
fn error_line(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| {
            v["fields"]["error"]
                .as_str()
                .or(v["fields"]["message"].as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| tail(stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_postgres_restart() {
    let Some(cfg) = world::cfg("torture_postgres_restart") else {
        return;
    };
    let mut rng = rng_for(&cfg, 3);
    let world = World::new(&cfg, &mut rng).await;
    let started = Instant::now();
    let shape = Shape::List;
    let config = world.config(shape);
    let target = shape.target();
    let rounds = if cfg.soak { 5 } else { 1 };
    let mut restarts = 0;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..rounds {
        for phase in ["import", "replay", "dispatch"] {
            let args: Vec<&str> = match phase {
                "import" => {
                    world.reset(shape).await;
                    vec!["run", &target, "--no-notify"]
                }
                "replay" => {
                    let mut a = vec!["replay", target.as_str()];
                    a.extend(REPLAY);
                    a
                }
                _ => {
                    // New reminders to send: reopen a few overdue invoices.
                    world.tick();
                    for _ in 0..6 {
                        let k = rng.random_range(1..=world::RECORDS);
                        world.vendor.update_invoice(&format!("in_{k:06}"), |inv| {
                            inv["status"] = serde_json::json!("open");
                            inv["due_date"] = serde_json::json!(1_700_000_000);
                        });
                        let mut ev = world.events.lock().unwrap();
                        ev.count += 1;
                        let seq = ev.count;
                        ev.latest.insert(format!("in_{k:06}"), seq);
                    }
                    world.converge(&cfg, shape).await;
                    vec!["notify"]
                }
            };
            // Slow pages (and sends), so that the restart lands in the middle.
            let path = if phase == "dispatch" {
                "/email/send"
            } else {
                "/v1/invoices"
            };
            world.vendor.inject(Fault::new(
                path,
                30,
                FaultKind::Delay(Duration::from_millis(80)),
            ));
            let child = world
                .idem(&config, &args, None)
                .spawn()
                .expect("idem starts");
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
            let before_rows = world.stored(&shape.table()).await.unwrap_or_default();
            let before_sent: Vec<String> = world
                .ledger(shape)
                .await
                .into_iter()
                .filter(|(_, (s, _))| s == "sent")
                .map(|(k, _)| k)
                .collect();
            world::restart_postgres();
            restarts += 1;
            let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
                .await
                .unwrap_or_else(|_| {
                    cfg.violation(format!(
                        "{phase}: idem neither failed nor recovered within 90s of a Postgres restart"
                    ))
                })
                .expect("wait for idem");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let outcome = if out.status.success() {
                "recovered"
            } else if clear_error(&stderr) {
                if round == 0 {
                    eprintln!("  {phase}: exit {}; {}", out.status, error_line(&stderr));
                }
                "failed clearly"
            } else {
                cfg.violation(format!(
                    "round {round}, {phase}: idem failed without a clear error after a Postgres restart (status {}): {}",
                    out.status,
                    tail(&stderr)
                ))
            };
            *outcomes.entry(format!("{phase} {outcome}")).or_default() += 1;
            // Nothing committed before the restart is lost.
            let after_rows = world.stored_after_restart(&shape.table()).await;
            for (id, v) in &before_rows {
                if after_rows.get(id) != Some(v) {
                    cfg.violation(format!(
                        "round {round}, {phase}: {id} was committed before the Postgres restart and is lost or changed after it"
                    ));
                }
            }
            let ledger = world.ledger(shape).await;
            for key in before_sent {
                if ledger.get(&key).map(|(s, _)| s.as_str()) != Some("sent") {
                    cfg.violation(format!(
                        "round {round}, {phase}: ledger row {key} was sent before the Postgres restart and is not after it"
                    ));
                }
            }
            cfg.check(world.check_not_ahead(shape).await);
            cfg.check(world.check_ledger_so_far(shape).await);
            world.converge(&cfg, shape).await;
            cfg.check(world.check_converged(shape).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    world.drain_ledger(&cfg, shape).await;
    let (expected, sent, review) = match world.check_ledger_final(shape).await {
        Ok(v) => v,
        Err(e) => cfg.violation(e),
    };
    eprintln!(
        "postgres_restart: OK in {:.0}s: restarts {restarts}; outcomes {outcomes:?}; records {}; emails expected {expected}, sent {sent}, needs_review {review}, duplicated 0",
        started.elapsed().as_secs_f64(),
        world.truth(shape).len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_racing_dispatchers() {
    let Some(cfg) = world::cfg("torture_racing_dispatchers") else {
        return;
    };
    let mut rng = rng_for(&cfg, 4);
    let world = World::new(&cfg, &mut rng).await;
    let started = Instant::now();
    let shape = Shape::List;
    let config = world.config(shape);
    let rounds = if cfg.soak { 10 } else { 2 };
    let mut attempts_total = 0;
    for round in 0..rounds {
        // New due reminders for this round.
        world.tick();
        for _ in 0..20 {
            let k = rng.random_range(1..=world::RECORDS);
            world.vendor.update_invoice(&format!("in_{k:06}"), |inv| {
                inv["status"] = serde_json::json!("open");
                inv["due_date"] = serde_json::json!(1_700_000_000);
            });
            let mut ev = world.events.lock().unwrap();
            ev.count += 1;
            let seq = ev.count;
            ev.latest.insert(format!("in_{k:06}"), seq);
        }
        let (status, stderr) = world
            .finish(world.idem(&config, &["run", &shape.target(), "--no-notify"], None))
            .await;
        assert!(status.success(), "the import failed: {}", tail(&stderr));
        // The mail API slows down past the send timeout (1s) and the lease (2s), or fails,
        // at random moments: the client gives up and drops the connection.
        for _ in 0..12 {
            let kind = match rng.random_range(0..4) {
                0 => FaultKind::Delay(Duration::from_millis(2500)),
                // Delivered, but the answer comes after the send timeout and the lease:
                // the dispatcher cannot tell, and another one may claim the row.
                1 => FaultKind::SlowAnswer(Duration::from_millis(2500)),
                2 => FaultKind::SlowAnswer(Duration::from_millis(1100)),
                _ => FaultKind::Delay(Duration::from_millis(10)),
            };
            world
                .vendor
                .inject(Fault::new("/email/send", rng.random_range(1..=3), kind));
        }
        world
            .vendor
            .inject(Fault::status("/email/send", 2, 503, None));
        let mut serve = world.spawn(world.idem(&config, &["serve"], None));
        let mut notifiers = Vec::new();
        for _ in 0..3 {
            notifiers.push(world.spawn(world.idem(&config, &["notify"], None)));
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            for n in notifiers.iter_mut() {
                if let Ok(Some(_)) = n.try_wait() {
                    *n = world.spawn(world.idem(&config, &["notify"], None));
                }
            }
            cfg.check(world.check_ledger_so_far(shape).await);
            let open = world
                .ledger(shape)
                .await
                .values()
                .filter(|(s, _)| s == "pending" || s == "sending")
                .count();
            if open == 0 {
                break;
            }
            if Instant::now() > deadline {
                cfg.violation(format!(
                    "round {round}: {open} ledger rows still pending or sending after 90s of racing dispatchers"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for mut n in notifiers {
            let _ = n.wait().await;
        }
        sigterm(&mut serve).await;
        attempts_total = world.vendor.request_count("/email/send");
    }
    let (expected, sent, review) = match world.check_ledger_final(shape).await {
        Ok(v) => v,
        Err(e) => cfg.violation(e),
    };
    eprintln!(
        "racing_dispatchers: OK in {:.0}s: 3 notify + 1 serve x {rounds} rounds; send attempts {attempts_total}; emails expected {expected}, ledger rows sent {sent}, needs_review {review}, delivered once each, duplicated 0",
        started.elapsed().as_secs_f64(),
    );
}

/// (stream, status, started_at, finished_at) of one `idem_runs` row.
type RunRow = (String, String, DateTime<Utc>, Option<DateTime<Utc>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_serve_replicas() {
    let Some(cfg) = world::cfg("torture_serve_replicas") else {
        return;
    };
    let mut rng = rng_for(&cfg, 5);
    let world = World::new(&cfg, &mut rng).await;
    let started = Instant::now();
    let schedules: String = (0..10)
        .map(|i| format!("[[serve.schedules]]\nstreams = [\"replicas.s{i}\"]\nevery = \"1s\"\n"))
        .collect();
    let config = world.replicas_config(&schedules);
    // Every page takes a while, so that runs are long enough to collide and to be killed.
    world.vendor.inject(Fault::new(
        "/v1/invoices",
        usize::MAX,
        FaultKind::Delay(Duration::from_millis(60)),
    ));
    // The victim starts first, alone, so that it certainly holds runs when it is killed;
    // the other two start while it does and contend for the same streams.
    let mut replicas = vec![world.spawn(world.idem(&config, &["serve"], None))];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM idem_runs WHERE status = 'running'")
                .fetch_one(&world.pool)
                .await
                .unwrap();
        // A replica runs `[serve] workers` streams at once (default 2).
        if running >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first replica never started runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..2 {
        replicas.push(world.spawn(world.idem(&config, &["serve"], None)));
    }
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
    let victim = 0;
    sigkill(&mut replicas[victim]).await;
    let killed_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    // Every stream completes a run after the kill, and its table equals the vendor's.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT stream) FROM idem_runs WHERE source_system = 'replicas' AND status = 'succeeded' AND started_at > $1",
        )
        .bind(killed_at)
        .fetch_one(&world.pool)
        .await
        .unwrap();
        if done == 10 {
            break;
        }
        if Instant::now() > deadline {
            cfg.violation(format!(
                "only {done} of 10 streams completed a run within 120s after a replica was killed"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, r) in replicas.iter_mut().enumerate() {
        if i != victim {
            sigterm(r).await;
        }
    }
    let truth = world.truth(Shape::List);
    for i in 0..10 {
        let table = format!("r{i}");
        let stored = world.stored(&table).await.unwrap_or_default();
        cfg.check(world::compare(&table, &stored, &truth));
    }
    // No stream ever had two runs overlapping in time. A run the kill interrupted ended
    // at the kill (it is marked abandoned, or left running, afterwards).
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT stream, status, started_at, finished_at FROM idem_runs WHERE source_system = 'replicas' ORDER BY stream, started_at",
    )
    .fetch_all(&world.pool)
    .await
    .unwrap();
    let mut last: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let mut interrupted = 0;
    for (stream, status, start, finish) in &runs {
        let end = match (status.as_str(), finish) {
            ("abandoned" | "running", f) if *start < killed_at => {
                interrupted += 1;
                f.map_or(killed_at, |f| f.min(killed_at))
            }
            ("abandoned" | "running", _) => cfg.violation(format!(
                "{stream}: a run started at {start} after the kill is {status}"
            )),
            (_, Some(f)) => *f,
            (_, None) => cfg.violation(format!("{stream}: a {status} run has no end")),
        };
        if let Some(prev_end) = last.get(stream) {
            if *start < *prev_end {
                cfg.violation(format!(
                    "{stream}: two runs overlap in time: one ends at {prev_end}, the next starts at {start}"
                ));
            }
        }
        last.insert(stream.clone(), end);
    }
    if interrupted == 0 {
        cfg.violation("the killed replica held no run: nothing was killed mid-run");
    }
    eprintln!(
        "serve_replicas: OK in {:.0}s: 3 replicas x 10 streams, replica {victim} killed; runs {}, interrupted by the kill {interrupted}, overlapping 0; every stream complete ({} records each)",
        started.elapsed().as_secs_f64(),
        runs.len(),
        truth.len()
    );
}
