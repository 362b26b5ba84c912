//! Headless Chromium driven through chromedriver's W3C WebDriver HTTP API with reqwest (no
//! WebDriver crate): Debian's `chromium` and `chromium-driver`, installed by
//! ops/install-test-deps. Missing browser: [`Driver::start`] returns `None` and the test says
//! SKIPPED, unless `TIDINGS_REQUIRE_BROWSER=1` (ops/test sets it), which makes it fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::free_port;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process, killed on drop.
pub struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    /// Ends chromedriver and every browser it started, even when the test panicked before
    /// quitting them: they share chromedriver's own process group.
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver, or returns `None` (after printing SKIPPED) when Chromium or
    /// chromedriver is not installed and the browser is not required.
    pub async fn start(test: &str) -> Option<Driver> {
        let missing: Vec<_> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).is_file())
            .collect();
        if !missing.is_empty() {
            let required = std::env::var("TIDINGS_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "TIDINGS_REQUIRE_BROWSER=1 but {missing:?} missing (ops/install-test-deps)"
            );
            println!("SKIPPED {test}: {missing:?} not installed (ops/install-test-deps)");
            return None;
        }
        let port = free_port();
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            // A group of its own, so Drop can end the browsers with it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.base))
                .send()
                .await;
            if let Ok(r) = ready
                && let Ok(bytes) = r.bytes().await
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && v["value"]["ready"] == true
            {
                return Some(driver);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new headless browser with a fresh profile.
    pub async fn browser(&self) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,800",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = send_json(self.http.post(format!("{}/session", self.base)), &caps).await;
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"));
        Browser {
            http: self.http.clone(),
            url: format!("{}/session/{id}", self.base),
            _profile: profile,
        }
    }
}

/// Sends `body` as JSON (none when null) and parses the JSON answer.
async fn send_json(req: reqwest::RequestBuilder, body: &Value) -> Value {
    let req = if body.is_null() {
        req
    } else {
        req.header("content-type", "application/json")
            .body(body.to_string())
    };
    let bytes = req
        .send()
        .await
        .expect("webdriver call")
        .bytes()
        .await
        .expect("webdriver answer");
    serde_json::from_slice(&bytes).expect("webdriver JSON")
}

/// One browser session.
pub struct Browser {
    http: reqwest::Client,
    url: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let req = self.http.request(method, format!("{}{path}", self.url));
        let v = send_json(req, &body).await;
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub async fn exec(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Polls `script` until it returns something truthy; returns that. Fails after 20 s.
    pub async fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.exec(script, json!([])).await;
            let truthy = !(v.is_null()
                || v == json!(false)
                || v == json!(0)
                || v == json!("")
                || v.as_array().is_some_and(Vec::is_empty));
            if truthy {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The element matching `css` (the first).
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    pub async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            json!({}),
        )
        .await;
    }

    /// Types `text` into the element (keys as a user presses them; "\u{E004}" is Tab).
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn clear(&self, css: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/clear"),
            json!({}),
        )
        .await;
    }

    /// Saves a PNG screenshot to `dir/name.png` and returns its path.
    pub async fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        use base64::Engine as _;
        let v = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 PNG"))
            .expect("decode screenshot");
        std::fs::create_dir_all(dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    pub async fn quit(self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}
