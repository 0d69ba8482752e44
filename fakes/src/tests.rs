//! Tests of the fake vendor over real HTTP (reqwest) and of the SMTP sink over raw TCP.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::*;

async fn get(url: &str) -> (u16, Value) {
    let resp = reqwest::get(url).await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn ids(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn seeded_invoices_have_the_documented_shape() {
    let v = FakeVendor::start().await;
    v.seed_invoices(30);
    let invs = v.invoices();
    assert_eq!(invs.len(), 30);
    assert_eq!(invs[0]["id"], "in_000001");
    assert_eq!(invs[0]["number"], "INV-10001");
    assert_eq!(invs[0]["customer"], "cus_0001");
    let size = serde_json::to_string(&invs[0]).unwrap().len();
    assert!((2300..=2500).contains(&size), "invoice is {size} bytes");
    let paid = invs.iter().filter(|i| i["status"] == "paid").count();
    assert_eq!(paid, 10);
    let overdue = invs
        .iter()
        .filter(|i| i["status"] == "open")
        .filter(|i| {
            i["due_date"]
                .as_i64()
                .is_some_and(|d| d < DEFAULT_CLOCK - 3 * 86_400)
        })
        .count();
    assert!((8..=12).contains(&overdue), "{overdue} overdue");
    assert!(
        invs.iter()
            .all(|i| i["updated"].as_i64() < Some(DEFAULT_CLOCK))
    );
    // Deterministic.
    let w = FakeVendor::start().await;
    w.seed_invoices(30);
    assert_eq!(w.invoices(), invs);
}

#[tokio::test]
async fn invoices_paginate_and_filter_with_ties() {
    let v = FakeVendor::start().await;
    v.seed_invoices(25);
    let base = v.base_url();
    // Walk all pages.
    let mut seen = Vec::new();
    let mut url = format!("{base}/v1/invoices?limit=10");
    loop {
        let (status, body) = get(&url).await;
        assert_eq!(status, 200);
        assert_eq!(body["object"], "list");
        let page = ids(&body, "data");
        seen.extend(page.clone());
        if !body["has_more"].as_bool().unwrap() {
            break;
        }
        url = format!(
            "{base}/v1/invoices?limit=10&starting_after={}",
            page.last().unwrap()
        );
    }
    let all: Vec<String> = v
        .invoices()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, all);

    // Ties: in_000004..in_000006 share one `updated`; gte on it includes all three.
    let invs = v.invoices();
    let t = invs[3]["updated"].as_i64().unwrap();
    assert_eq!(invs[4]["updated"].as_i64(), Some(t));
    assert_eq!(invs[5]["updated"].as_i64(), Some(t));
    assert_ne!(invs[2]["updated"].as_i64(), Some(t));
    let (_, body) = get(&format!(
        "{base}/v1/invoices?limit=100&updated%5Bgte%5D={t}"
    ))
    .await;
    let got = ids(&body, "data");
    assert_eq!(got.first().map(String::as_str), Some("in_000004"));
    assert_eq!(got.len(), 22);
    let (_, body) = get(&format!(
        "{base}/v1/invoices?limit=100&updated[gte]={t}&updated[lt]={}",
        t + 1
    ))
    .await;
    assert_eq!(ids(&body, "data"), ["in_000004", "in_000005", "in_000006"]);

    // An update moves `updated` to the clock but not the list position.
    v.set_clock(DEFAULT_CLOCK + 100);
    v.update_invoice("in_000002", |inv| inv["status"] = json!("paid"));
    let (_, body) = get(&format!(
        "{base}/v1/invoices?updated[gte]={}",
        DEFAULT_CLOCK + 100
    ))
    .await;
    assert_eq!(ids(&body, "data"), ["in_000002"]);
    assert_eq!(body["data"][0]["status"], "paid");
    assert_eq!(body["has_more"], false);

    // Events: newest first, created + updated.
    let (_, ev) = get(&format!("{base}/v1/events?limit=2")).await;
    assert_eq!(ev["data"][0]["id"], "evt_000026");
    assert_eq!(ev["data"][0]["type"], "invoice.updated");
    assert_eq!(ev["data"][0]["data"]["object"]["status"], "paid");
    assert_eq!(ev["data"][1]["type"], "invoice.created");
    assert_eq!(ev["has_more"], true);
    let (_, ev) = get(&format!(
        "{base}/v1/events?limit=3&ending_before=evt_000024"
    ))
    .await;
    assert_eq!(ids(&ev, "data"), ["evt_000026", "evt_000025"]);
    assert_eq!(ev["has_more"], false);

    // Customers are derived from invoices.
    let (_, cs) = get(&format!("{base}/v1/customers?limit=100")).await;
    assert_eq!(ids(&cs, "data").len(), 7);
}

#[tokio::test]
async fn status_fault_has_retry_after_then_clears() {
    let v = FakeVendor::start().await;
    v.seed_invoices(3);
    v.require_bearer("sekret");
    v.inject(Fault::status("/v1/invoices", 2, 429, Some("1")));
    let client = reqwest::Client::new();
    let url = format!("{}/v1/invoices", v.base_url());
    for _ in 0..2 {
        // Faults come before auth: no token needed to see the 429.
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 429);
        assert_eq!(resp.headers()["retry-after"], "1");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], 429);
    }
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = client.get(&url).bearer_auth("sekret").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let statuses: Vec<u16> = v.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 401, 200]);
    assert_eq!(v.request_count("/v1/"), 4);
    assert_eq!(
        v.requests()[3].authorization.as_deref(),
        Some("Bearer sekret")
    );
}

#[tokio::test]
async fn shape_faults_and_hooks() {
    let v = FakeVendor::start().await;
    v.seed_invoices(6);
    let base = v.base_url();
    v.inject(Fault::new("/v1/invoices", 1, FaultKind::MalformedJson));
    let resp = reqwest::get(format!("{base}/v1/invoices")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err());

    v.inject(Fault::new("/paged", 1, FaultKind::WrongShape));
    let (_, body) = get(&format!("{base}/paged/page?per_page=2")).await;
    assert!(body["items"].is_object());

    v.inject(Fault::new("/v1/invoices", 1, FaultKind::DuplicateRecords));
    let (_, body) = get(&format!(
        "{base}/v1/invoices?limit=2&starting_after=in_000002"
    ))
    .await;
    assert_eq!(ids(&body, "data"), ["in_000002", "in_000003", "in_000004"]);

    // A hook mutating the data directly before the 5th request; it becomes an event.
    v.on_request(4, |d| {
        d.invoices.get_mut("in_000001").unwrap()["amount_due"] = json!(1);
    });
    let (_, body) = get(&format!("{base}/v1/invoices?limit=1")).await;
    assert_eq!(body["data"][0]["amount_due"], 1);
    let (_, ev) = get(&format!("{base}/v1/events?limit=1")).await;
    assert_eq!(ev["data"][0]["type"], "invoice.updated");

    v.inject(Fault::new(
        "/paged",
        1,
        FaultKind::Delay(Duration::from_secs(5)),
    ));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = client.get(format!("{base}/paged/stuck")).send().await;
    assert!(err.is_err_and(|e| e.is_timeout()));
}

#[tokio::test]
async fn generic_pagination_endpoints() {
    let v = FakeVendor::start().await;
    v.seed_invoices(5);
    let base = v.base_url();
    let (_, p) = get(&format!("{base}/paged/next_url?per_page=2")).await;
    assert_eq!(ids(&p, "items"), ["in_000001", "in_000002"]);
    let (_, p) = get(p["next"].as_str().unwrap()).await;
    let (_, p) = get(p["next"].as_str().unwrap()).await;
    assert_eq!(ids(&p, "items"), ["in_000005"]);
    assert!(p["next"].is_null());

    let resp = reqwest::get(format!("{base}/paged/link?per_page=3"))
        .await
        .unwrap();
    let link = resp.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(
        link,
        format!("<{base}/paged/link?per_page=3&page=2>; rel=\"next\"")
    );
    let resp = reqwest::get(format!("{base}/paged/link?per_page=3&page=2"))
        .await
        .unwrap();
    assert!(resp.headers().get("link").is_none());

    let (_, p) = get(&format!("{base}/paged/page?page=3&per_page=2")).await;
    assert_eq!(ids(&p, "items"), ["in_000005"]);
    let (_, p) = get(&format!("{base}/paged/page?page=4&per_page=2")).await;
    assert!(ids(&p, "items").is_empty());
    let (_, p) = get(&format!("{base}/paged/offset?offset=3&limit=10")).await;
    assert_eq!(p["total"], 5);
    assert_eq!(ids(&p, "items"), ["in_000004", "in_000005"]);
    let (_, a) = get(&format!("{base}/paged/stuck")).await;
    let (_, b) = get(&format!("{base}/paged/stuck?cursor=abc")).await;
    assert_eq!(a, b);
    assert_eq!(a["next_cursor"], "abc");
}

#[tokio::test]
async fn oauth2_api_key_and_basic() {
    let v = FakeVendor::start().await;
    v.seed_invoices(1);
    let base = v.base_url();
    let c = reqwest::Client::new();
    let url = format!("{base}/v1/invoices");
    v.require_oauth2("cid", "csecret", Duration::from_secs(60));
    assert_eq!(c.get(&url).send().await.unwrap().status().as_u16(), 401);
    let bad = c
        .post(format!("{base}/oauth/token"))
        .basic_auth("cid", Some("nope"))
        .body("grant_type=client_credentials")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 401);
    let tok: Value = c
        .post(format!("{base}/oauth/token"))
        .basic_auth("cid", Some("csecret"))
        .body("grant_type=client_credentials")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["expires_in"], 60);
    let at = tok["access_token"].as_str().unwrap();
    assert_eq!(
        c.get(&url)
            .bearer_auth(at)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    v.expire_all_tokens();
    assert_eq!(
        c.get(&url)
            .bearer_auth(at)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );

    v.require_api_key(ApiKeyPlace::Query("api_key".into()), "k1");
    assert_eq!(
        c.get(format!("{url}?api_key=k1"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    v.require_api_key(ApiKeyPlace::Header("X-Api-Key".into()), "k1");
    assert_eq!(
        c.get(&url)
            .header("x-api-key", "k1")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    v.require_basic("u", "p:w");
    assert_eq!(
        c.get(&url)
            .basic_auth("u", Some("p:w"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        c.get(&url)
            .basic_auth("u", Some("x"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
}

async fn search(c: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let resp = c
        .post(format!("{base}/crm/v3/objects/contacts/search"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn hubspot_search_filters_sorts_and_caps_at_10k() {
    let v = FakeVendor::start().await;
    v.seed_contacts(10_050);
    let base = v.base_url();
    let c = reqwest::Client::new();
    let sorts = json!([{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}]);

    let (status, body) = search(
        &c,
        &base,
        json!({"sorts": sorts, "limit": 100, "after": "9900"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["total"], 10_050);
    assert_eq!(body["results"].as_array().unwrap().len(), 100);
    assert_eq!(body["paging"]["next"]["after"], "10000");
    let (status, body) = search(
        &c,
        &base,
        json!({"sorts": sorts, "limit": 100, "after": "10000"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["status"], "error");
    assert!(body["message"].as_str().unwrap().contains("10000"));

    // Filter on a tied lastmodifieddate: GTE includes the whole tie group, GT skips it.
    let contacts = v.contacts();
    let tie = &contacts[3]["properties"]["lastmodifieddate"];
    assert_eq!(&contacts[5]["properties"]["lastmodifieddate"], tie);
    let ms = super::data::parse_ms(tie.as_str().unwrap()).unwrap();
    let f = |op: &str| {
        json!({"filterGroups": [{"filters": [
            {"propertyName": "lastmodifieddate", "operator": op, "value": ms.to_string()},
            {"propertyName": "lastmodifieddate", "operator": "LT", "value": (ms + 30_000).to_string()},
        ]}], "sorts": sorts, "limit": 10})
    };
    let (_, body) = search(&c, &base, f("GTE")).await;
    assert_eq!(ids(&body, "results"), ["1004", "1005", "1006"]);
    assert!(body.get("paging").is_none());
    assert_eq!(body["results"][0]["properties"]["hs_object_id"], "1004");
    let (_, body) = search(&c, &base, f("GT")).await;
    assert!(ids(&body, "results").is_empty());

    // The list endpoint pages by id with an absolute next link.
    let (_, body) = get(&format!("{base}/crm/v3/objects/contacts?limit=2")).await;
    assert_eq!(ids(&body, "results"), ["1001", "1002"]);
    let (_, body) = get(body["paging"]["next"]["link"].as_str().unwrap()).await;
    assert_eq!(ids(&body, "results"), ["1003", "1004"]);
}

#[tokio::test]
async fn email_api_honors_idempotency_keys() {
    let v = FakeVendor::start().await;
    let c = reqwest::Client::new();
    let url = format!("{}/email/send", v.base_url());
    let mail = json!({"to": "a@example.com", "subject": "Overdue", "body": "Pay", "message_id": "<m1@idem>"});
    let send = |key: &'static str, body: Value| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c
                .post(url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s1, b1) = send("k1", mail.clone()).await;
    let (s2, b2) = send("k1", mail.clone()).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1["id"], b2["id"]);
    let mut other = mail.clone();
    other["subject"] = json!("Different");
    assert_eq!(send("k1", other.clone()).await.0, 422);
    assert_eq!(send("k2", other).await.0, 200);
    let emails = v.emails();
    assert_eq!(emails.len(), 2);
    assert_eq!(emails[0].idempotency_key.as_deref(), Some("k1"));
    assert_eq!(emails[0].message_id.as_deref(), Some("<m1@idem>"));
    assert_eq!(emails[1].subject, "Different");

    v.inject(Fault::status("/email", 1, 503, None));
    assert_eq!(send("k3", mail.clone()).await.0, 503);
    assert_eq!(v.emails().len(), 2);
    assert_eq!(v.requests()[4].idempotency_key.as_deref(), Some("k3"));
}

#[tokio::test]
async fn control_endpoints_for_shell_demos() {
    let v = FakeVendor::start().await;
    v.seed_invoices(2);
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/_fake/update_invoice/in_000001", v.base_url()))
        .json(&json!({"status": "void"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(v.invoices()[0]["status"], "void");
    assert_eq!(v.invoices()[0]["updated"], DEFAULT_CLOCK);
    let (_, st) = get(&format!("{}/_fake/state", v.base_url())).await;
    assert_eq!(st["invoices"], 2);
    assert_eq!(st["events"], 3);
    assert!(v.requests().is_empty());
}

/// Reads one (possibly multi-line) SMTP reply and returns its code.
async fn read_reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3).unwrap_or("EOF").to_owned();
        }
    }
}

/// Speaks SMTP over a raw socket and returns the server's replies' codes.
async fn smtp_send(addr: SocketAddr, subject: &str, msg_id: &str) -> Vec<String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut codes = Vec::new();
    codes.push(read_reply(&mut r).await);
    let data = format!(
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\nMessage-ID: {msg_id}\r\n\r\nHello\r\n..dot line\r\n.\r\n"
    );
    for cmd in [
        "HELO client.example\r\n".to_owned(),
        "MAIL FROM:<a@example.com>\r\n".to_owned(),
        "RCPT TO:<b@example.com>\r\n".to_owned(),
        "RCPT TO:<c@example.com>\r\n".to_owned(),
        "DATA\r\n".to_owned(),
        data,
        "QUIT\r\n".to_owned(),
    ] {
        w.write_all(cmd.as_bytes()).await.unwrap();
        codes.push(read_reply(&mut r).await);
    }
    codes
}

#[tokio::test]
async fn smtp_sink_round_trip_and_restart_on_same_addr() {
    let sink = SmtpSink::start().await;
    let addr = sink.addr();
    let codes = smtp_send(addr, "Reminder 1", "<r1@idem>").await;
    assert_eq!(
        codes,
        ["220", "250", "250", "250", "250", "354", "250", "221"]
    );
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].from, "a@example.com");
    assert_eq!(msgs[0].to, ["b@example.com", "c@example.com"]);
    assert_eq!(msgs[0].subject.as_deref(), Some("Reminder 1"));
    assert_eq!(msgs[0].message_id.as_deref(), Some("<r1@idem>"));
    assert!(msgs[0].data.ends_with("Hello\r\n.dot line\r\n"));

    // Keep an idle connection open: stop must still close it.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(2), sink.stop())
        .await
        .unwrap();
    assert_eq!(stopped.len(), 1);
    assert!(TcpStream::connect(addr).await.is_err(), "down after stop");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncReadExt::read_to_end(&mut idle, &mut buf),
    )
    .await
    .unwrap();

    let sink = SmtpSink::start_on(addr).await.unwrap();
    smtp_send(addr, "Reminder 2", "<r2@idem>").await;
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].subject.as_deref(), Some("Reminder 2"));

    let v = FakeVendor::start().await;
    v.attach_mailbox(&sink);
    let (_, mb) = get(&format!("{}/_fake/mailbox", v.base_url())).await;
    assert_eq!(mb[0]["message_id"], "<r2@idem>");
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (i, o) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
    ] {
        assert_eq!(server::base64(i.as_bytes()), o);
    }
}

/// The raw bodies of every page of `path?query`, following `starting_after` from the
/// last record of each page while `has_more`.
async fn raw_walk(c: &reqwest::Client, base: &str, path: &str, query: &str) -> Vec<String> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}{path}?{query}");
        if let Some(a) = &after {
            url.push_str(&format!("&starting_after={a}"));
        }
        let resp = c.get(&url).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 200, "{url}");
        let text = resp.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).expect("json");
        pages.push(text);
        let last = body["data"].as_array().and_then(|d| d.last()).cloned();
        match last {
            Some(last) if body["has_more"] == true => {
                after = Some(last["id"].as_str().expect("id").to_owned());
            }
            _ => return pages,
        }
    }
}

async fn raw_get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = c.get(url).send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

/// Asserts that every invoice-reading endpoint answers `a` and `b` byte for byte.
async fn assert_same_invoices(a: &FakeVendor, b: &FakeVendor, limits: &[usize]) {
    let c = reqwest::Client::new();
    let (ua, ub) = (a.base_url(), b.base_url());
    let invs = a.invoices();
    assert_eq!(invs, b.invoices());
    let mut updated: Vec<i64> = invs.iter().filter_map(|i| i["updated"].as_i64()).collect();
    let mut created: Vec<i64> = invs.iter().filter_map(|i| i["created"].as_i64()).collect();
    updated.sort_unstable();
    created.sort_unstable();
    let (u_mid, u_late) = (updated[updated.len() / 2], updated[updated.len() * 9 / 10]);
    let c_mid = created[created.len() / 2];
    let filters = [
        String::new(),
        format!("&updated[gte]={u_mid}"),
        format!("&updated[gte]={u_late}"),
        format!("&updated[gt]={u_mid}"),
        format!("&updated[lt]={u_mid}"),
        format!("&updated[lte]={u_mid}"),
        format!("&updated[gte]={u_mid}&updated[lt]={u_late}"),
        format!("&created[gte]={c_mid}"),
        format!("&created[lt]={c_mid}"),
        format!("&created[gte]={c_mid}&updated[lte]={u_late}"),
        format!("&updated[gt]={}", updated[updated.len() - 1]),
    ];
    for limit in limits {
        for f in &filters {
            let q = format!("limit={limit}{f}");
            let pa = raw_walk(&c, &ua, "/v1/invoices", &q).await;
            assert_eq!(pa, raw_walk(&c, &ub, "/v1/invoices", &q).await, "{q}");
        }
        let q = format!("limit={limit}");
        let ea = raw_walk(&c, &ua, "/v1/events", &q).await;
        assert_eq!(ea, raw_walk(&c, &ub, "/v1/events", &q).await, "events {q}");
    }
    // starting_after ids that exist and that fall between ids.
    for after in [
        "in_",
        "in_1",
        "in_100000",
        "in_1000000",
        "in_1000005x",
        "in_100001",
        "in_5",
        "in_999995",
        "in_999999",
        "in_9999999",
        "zz",
    ] {
        let q = format!("limit=5&starting_after={after}");
        let (sa, ba) = raw_get(&c, &format!("{ua}/v1/invoices?{q}")).await;
        let (sb, bb) = raw_get(&c, &format!("{ub}/v1/invoices?{q}")).await;
        assert_eq!((sa, ba), (sb, bb), "{q}");
    }
    for path in [
        "/v1/customers?limit=100",
        "/paged/next_url?per_page=7&after=in_1000003",
        "/paged/link?per_page=7&page=2",
        "/paged/page?per_page=7&page=3",
        "/paged/offset?offset=5&limit=9",
        "/paged/stuck?per_page=4",
        "/v1/invoices/in_1000002/lines?limit=3",
        "/v1/invoices/in_999993/lines",
        "/v1/invoices/in_1000099/lines",
        "/_fake/state",
    ] {
        let (sa, ba) = raw_get(&c, &format!("{ua}{path}")).await;
        let (sb, bb) = raw_get(&c, &format!("{ub}{path}")).await;
        let ba = ba.replace(&ua, "BASE");
        let bb = bb.replace(&ub, "BASE");
        assert_eq!((sa, ba), (sb, bb), "{path}");
    }
    // The duplicated-records fault repeats the same predecessor.
    for v in [a, b] {
        v.inject(Fault::new("/v1/invoices", 1, FaultKind::DuplicateRecords));
    }
    let q = format!("/v1/invoices?limit=4&starting_after=in_1000004&updated[gte]={u_mid}");
    let (sa, ba) = raw_get(&c, &format!("{ua}{q}")).await;
    let (sb, bb) = raw_get(&c, &format!("{ub}{q}")).await;
    assert_eq!((sa, ba), (sb, bb), "{q}");
}

/// The same invoices in `seeded` (stored) and `bulk`: a few stored ones whose ids
/// interleave with the seeded ones ("in_100000" < "in_1000000" < ... < "in_100001"),
/// then `n` seeded from number 999,991 on, crossing to seven-digit ids.
async fn seed_pair(n: usize) -> (FakeVendor, FakeVendor) {
    let seeded = FakeVendor::start().await;
    let bulk = FakeVendor::start().await;
    for v in [&seeded, &bulk] {
        for id in ["in_100000", "in_100001", "in_999990"] {
            v.insert_invoice(json!({"id": id, "customer": "cus_0002", "amount_due": 7}));
        }
        v.set_clock(DEFAULT_CLOCK + 1000);
    }
    seeded.seed_invoices(n);
    bulk.seed_bulk_invoices(n);
    (seeded, bulk)
}

#[tokio::test]
async fn bulk_invoices_serve_the_same_bytes_as_stored_ones() {
    let (seeded, bulk) = seed_pair(40).await;
    assert_same_invoices(&seeded, &bulk, &[1, 3, 10, 100]).await;

    // Changes: through the control endpoint (also on a stored one), the API, a hook
    // writing the map directly, a removal and new invoices after the seeded ones.
    let c = reqwest::Client::new();
    for v in [&seeded, &bulk] {
        v.set_clock(DEFAULT_CLOCK + 2000);
        for id in ["in_1000000", "in_999995", "in_100001", "in_1000030"] {
            let r = c
                .post(format!("{}/_fake/update_invoice/{id}", v.base_url()))
                .json(&json!({"amount_due": 4242}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200, "{id}");
        }
        let r = c
            .post(format!("{}/_fake/update_invoice/in_1000031", v.base_url()))
            .json(&json!({"amount_due": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        v.update_invoice("in_1000007", |inv| inv["status"] = json!("void"));
        v.update_invoice("in_1000007", |inv| inv["status"] = json!("paid"));
        assert!(v.remove_invoice("in_999997"));
        assert!(!v.remove_invoice("in_999997"));
        assert!(v.set_invoice_lines("in_1000010", vec![json!({"id": "il_x", "amount": 5})]));
        v.on_request(v.requests().len() + 1, |d| {
            d.invoices.insert(
                "in_1000020".into(),
                json!({"id": "in_1000020", "created": 1, "updated": DEFAULT_CLOCK + 2000}),
            );
        });
        v.insert_invoice(json!({"id": "in_999992", "created": 5, "updated": 6}));
        v.seed_long_invoices(2, 12);
        v.seed_invoices(3);
    }
    assert_same_invoices(&seeded, &bulk, &[1, 7, 100]).await;
}

#[tokio::test]
async fn bulk_invoices_match_at_a_larger_size() {
    let (seeded, bulk) = seed_pair(2000).await;
    assert_same_invoices(&seeded, &bulk, &[100]).await;
}

#[test]
fn bulk_order_is_the_lexical_id_order() {
    let b = crate::data::bulk::BulkInvoices::new(99_990, 1_000_100 - 99_990, DEFAULT_CLOCK);
    let ids: Vec<String> = (0..b.len())
        .map(|i| b.id(b.at(i)).as_str().to_owned())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let at = |id: &str| ids.iter().position(|x| x == id).unwrap();
    assert_eq!(at("in_100000") + 1, at("in_1000000"));
    assert_eq!(at("in_1000009") + 1, at("in_100001"));
    assert_eq!(ids[0], "in_099990");
    assert_eq!(ids.last().map(String::as_str), Some("in_999999"));
    // The bench names its changes with Python's {:06}, the seeder with Rust's.
    assert_eq!(
        crate::data::bulk::IdBuf::new(1_000_000).as_str(),
        "in_1000000"
    );
    assert_eq!(b.pos_of("in_1000000"), Some(1_000_000 - 99_990));
    assert_eq!(b.pos_of("in_01000000"), None);
    assert_eq!(b.pos_of("in_+1000000"), None);
}
