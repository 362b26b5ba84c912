//! A client of the admin listener (plain HTTP) for the tests that call it.

use serde_json::Value;

use super::Server;

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    /// The body as sent (`body` is its UTF-8 reading).
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn lines(&self) -> Vec<Value> {
        super::json_lines(self.body.as_bytes())
    }

    /// The `{"error":{"code":..}}` body's code.
    pub fn code(&self) -> String {
        let v: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("error body {:?} is not JSON: {e}", self.body));
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

pub struct Admin {
    pub base: String,
    pub client: reqwest::Client,
}

impl Admin {
    pub fn new(server: &Server) -> Admin {
        Admin {
            base: format!("http://127.0.0.1:{}", server.admin_port),
            client: super::http_client(),
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = resp.bytes().await.expect("body").to_vec();
        Reply {
            status,
            content_type,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }

    /// GET `path` with `Authorization: <authorization>` if given.
    pub async fn get(&self, path: &str, authorization: Option<&str>) -> Reply {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        self.send(req).await
    }

    pub async fn get_as(&self, path: &str, token: &str) -> Reply {
        self.get(path, Some(&format!("Bearer {token}"))).await
    }

    /// POST `body` (JSON) to `path` as `token`.
    pub async fn post_as(&self, path: &str, token: &str, body: Value) -> Reply {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        self.send(req).await
    }
}

impl Admin {
    /// GET as `token`: the status and the body's text.
    pub async fn get_text(&self, path: &str, token: &str) -> (u16, String) {
        let r = self.get_as(path, token).await;
        (r.status, r.body)
    }

    /// POST `body` as `token`: the status and the answer as JSON (`{"text":..}` if it is not).
    pub async fn post_json(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        let r = self.post_as(path, token, body).await;
        let json = serde_json::from_str(r.body.trim())
            .unwrap_or_else(|_| serde_json::json!({ "text": r.body }));
        (r.status, json)
    }
}
