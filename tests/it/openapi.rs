//! The OpenAPI document describes exactly the routes that exist; the payment list pages well.

use std::collections::BTreeSet;

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_document_lists_exactly_the_routes_that_exist() {
    let app = TestApp::spawn().await;
    let r = request("GET", &app.url("/openapi.json"), &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["openapi"], "3.1.0");
    let documented: BTreeSet<(String, String)> = r.json["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (path.clone(), m.to_ascii_uppercase()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = async_pay::api::route_table()
        .into_iter()
        .map(|(p, m, _)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(documented, served, "the document and the router disagree");

    // And every route really answers (not the router's 404/405).
    for (path, method) in &served {
        let path = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        let resp = request(
            method,
            &app.url(&path),
            &[("X-API-Key", KEY_A)],
            Some(b"{}".to_vec()),
        )
        .await;
        assert_ne!(resp.status, 405, "{method} {path}");
        assert!(
            resp.code() != "not_found" || resp.json["error"]["message"] != "route not found",
            "{method} {path}"
        );
    }
    // Every error status a handler can give is documented for it, with the error schema.
    let create = &r.json["paths"]["/api/v1/payments"]["post"]["responses"];
    for code in ["202", "400", "401", "409", "413", "415", "422", "503"] {
        assert!(
            create[code].is_object(),
            "POST /api/v1/payments lacks {code}"
        );
    }
    assert!(r.json["components"]["schemas"]["PaymentOut"]["properties"]["webhook"].is_object());
    assert!(r.json["components"]["securitySchemes"]["api_key"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_pages_newest_first_and_is_stable_under_inserts() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let r = app
            .post_payment(
                KEY_A,
                &format!("l-{i}"),
                json!({"amount": "1", "currency": "RUB"}),
            )
            .await;
        ids.push(r.json["payment_id"].as_str().unwrap().to_string());
    }
    app.post_payment(
        KEY_B,
        "other-merchant",
        json!({"amount": "1", "currency": "RUB"}),
    )
    .await;
    let page = |q: String| {
        let url = app.url(&format!("/api/v1/payments?{q}"));
        async move { request("GET", &url, &[("X-API-Key", KEY_A)], None).await }
    };
    let p1 = page("limit=3".into()).await;
    assert_eq!(p1.status, 200, "{}", p1.text);
    let got1: Vec<String> = p1.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got1,
        vec![ids[6].clone(), ids[5].clone(), ids[4].clone()],
        "newest first"
    );
    // New payments arrive between pages: the next page continues where the first ended.
    for i in 0..3 {
        app.post_payment(
            KEY_A,
            &format!("late-{i}"),
            json!({"amount": "1", "currency": "RUB"}),
        )
        .await;
    }
    let cursor = p1.json["next_cursor"].as_str().unwrap();
    let p2 = page(format!("limit=3&cursor={cursor}")).await;
    let got2: Vec<String> = p2.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got2, vec![ids[3].clone(), ids[2].clone(), ids[1].clone()]);
    let p3 = page(format!(
        "limit=3&cursor={}",
        p2.json["next_cursor"].as_str().unwrap()
    ))
    .await;
    assert_eq!(p3.json["data"].as_array().unwrap().len(), 1);
    assert!(p3.json["next_cursor"].is_null(), "last page");
    // Default page, filters, scoping.
    let all = page(String::new()).await;
    assert_eq!(
        all.json["data"].as_array().unwrap().len(),
        10,
        "merchant B's payment is not listed"
    );
    assert_eq!(
        page("status=succeeded".into()).await.json["data"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        page("status=pending".into()).await.json["data"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    let first_created = all.json["data"][9]["created_at"]
        .as_str()
        .unwrap()
        .to_string();
    let after = page(format!(
        "created_after={}",
        first_created.replace('+', "%2B")
    ))
    .await;
    assert_eq!(after.json["data"].as_array().unwrap().len(), 9);
    assert_eq!(
        page("created_before=2000-01-01T00:00:00Z".into())
            .await
            .json["data"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=500", "limit"),
        ("status=paid", "status"),
        ("cursor=zzz", "cursor"),
        ("created_after=today", "created_after"),
        ("order=asc", "order"),
    ] {
        let r = page(q.into()).await;
        assert_eq!(
            (r.status, r.json["error"]["field"].as_str()),
            (422, Some(field)),
            "{q}"
        );
    }
    let r = request("GET", &app.url("/api/v1/payments"), &[], None).await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_can_move_its_metrics_off_the_api_port() {
    let db = TestDb::new().await;
    let mut s = settings(&db.url);
    s.server.metrics_bind = "127.0.0.1:0".into();
    let started = async_pay::roles::serve::start(&s).unwrap();
    let metrics = started.metrics.as_ref().expect("metrics served apart").addr;
    tokio::spawn(started.server);
    let api = format!("http://{}", started.addr);
    let on_api = request("GET", &format!("{api}/metrics"), &[], None).await;
    assert_eq!(
        (on_api.status, on_api.code()),
        (404, "not_found"),
        "not on the API port: {}",
        on_api.text
    );
    let doc = request("GET", &format!("{api}/openapi.json"), &[], None).await;
    assert!(doc.json["paths"]["/api/v1/payments"].is_object());
    assert!(
        doc.json["paths"]["/metrics"].is_null(),
        "the document lists only what the API port serves"
    );
    // The API's own requests show on the metrics address, with the outbox gauges.
    let scraped = request("GET", &format!("http://{metrics}/metrics"), &[], None).await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped.text.contains(
            r#"async_pay_http_requests_total{method="GET",route="/openapi.json",status="200"}"#
        ),
        "{}",
        scraped.text
    );
    assert!(scraped.text.contains("async_pay_outbox_unpublished 0"));
    drop(db);
}
