//! `[otlp]`: exporting spans to an OpenTelemetry collector over OTLP/HTTP (protobuf), in
//! `relay.toml` and `connector.toml` alike. Absent, nothing is exported; trace ids are in
//! the access logs either way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `[otlp]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP traces URL, `http://` or `https://`. A URL without a
    /// path (`http://collector:4318`) gets the standard `/v1/traces`.
    pub endpoint: OtlpEndpoint,
    /// Of the traces this daemon starts (a request without a sampled `traceparent`), the
    /// share exported, 0.0 to 1.0, decided from the trace id so every hop agrees. A
    /// caller's `traceparent` decides for its trace (its sampled flag), as does the
    /// relay's for the connector.
    #[serde(default = "one")]
    pub sample_ratio: SampleRatio,
    /// Headers sent with every export, such as a vendor's API key.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A PEM file of CA certificates to trust for an `https://` endpoint instead of the
    /// system's.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Time allowed for one export request.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub timeout: Duration,
    /// `service.name` of the exported spans; default the binary's name.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Allow `headers` (often an API key) to an `http://` endpoint, where they travel in
    /// the clear; refused otherwise.
    #[serde(default)]
    pub allow_insecure: bool,
}

fn one() -> SampleRatio {
    SampleRatio(1.0)
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

/// An `http://` or `https://` URL with a host, its path defaulted to `/v1/traces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint(String);

impl OtlpEndpoint {
    /// Parses and completes `s`, or says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("endpoint {s:?} is not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => {
                return Err(format!(
                    "endpoint {s:?} must start with http:// or https:// (OTLP over HTTP, for example http://127.0.0.1:4318)"
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("endpoint {s:?} names no host"));
        }
        let path = uri.path();
        if path.is_empty() || path == "/" {
            Ok(Self(format!("{}/v1/traces", s.trim_end_matches('/'))))
        } else {
            Ok(Self(s.to_owned()))
        }
    }

    /// The URL spans are posted to.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is a plain `http://` URL (the scheme in any case).
    pub fn is_plaintext(&self) -> bool {
        self.0
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    }
}

impl<'de> Deserialize<'de> for OtlpEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A share from 0.0 to 1.0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRatio(f64);

impl SampleRatio {
    /// The share, 0.0 to 1.0.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for SampleRatio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&v) {
            Ok(Self(v))
        } else {
            Err(serde::de::Error::custom(format!(
                "sample_ratio {v} is not between 0.0 and 1.0"
            )))
        }
    }
}

impl OtlpConfig {
    /// Checks what serde cannot: header names and values an HTTP request can carry, and
    /// no headers over plain `http://` without `allow_insecure`.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("otlp.headers: {name:?} is not a header name"));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(format!(
                    "otlp.headers.{name}: the value is not a valid header value"
                ));
            }
        }
        if self.timeout < Duration::from_millis(100) {
            return Err("otlp.timeout must be at least 100ms".into());
        }
        if !self.headers.is_empty() && self.endpoint.is_plaintext() && !self.allow_insecure {
            return Err(format!(
                "otlp.headers would be sent in the clear to {}: use an https:// endpoint, or set otlp.allow_insecure = true",
                self.endpoint.as_str()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use std::path::Path;

    #[derive(Debug, Deserialize)]
    struct Wrapper {
        otlp: OtlpConfig,
    }

    fn parse(text: &str) -> Result<OtlpConfig, String> {
        parse_str::<Wrapper>(Path::new("x.toml"), text)
            .map(|w| w.otlp)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn endpoint_path_defaults_to_v1_traces() {
        let c = parse("[otlp]\nendpoint = \"http://127.0.0.1:4318\"\n").unwrap();
        assert_eq!(c.endpoint.as_str(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(c.sample_ratio.get(), 1.0);
        assert_eq!(c.timeout, Duration::from_secs(10));
        let c = parse("[otlp]\nendpoint = \"https://otel.example.com/custom/traces\"\nsample_ratio = 0.25\n[otlp.headers]\nx-api-key = \"k\"\n").unwrap();
        assert_eq!(
            c.endpoint.as_str(),
            "https://otel.example.com/custom/traces"
        );
        assert_eq!(c.sample_ratio.get(), 0.25);
        assert_eq!(c.headers["x-api-key"], "k");
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_line_and_the_fix() {
        let e = parse("[otlp]\nendpoint = \"grpc://collector:4317\"\n").unwrap_err();
        assert!(e.starts_with("x.toml:2:"), "{e}");
        assert!(e.contains("http:// or https://"), "{e}");
        let e = parse("[otlp]\nendpoint = \"http://c:4318\"\nsample_ratio = 1.5\n").unwrap_err();
        assert!(e.starts_with("x.toml:3:"), "{e}");
        assert!(e.contains("between 0.0 and 1.0"), "{e}");
        let e = parse("[otlp]\nendpoint = \"http://c:4318\"\nendpont = 1\n").unwrap_err();
        assert!(e.contains("endpont"), "{e}");
        let c =
            parse("[otlp]\nendpoint = \"http://c:4318\"\n[otlp.headers]\n\"bad name\" = \"v\"\n")
                .unwrap();
        assert!(c.validate().unwrap_err().contains("not a header name"));
    }

    #[test]
    fn headers_in_the_clear_need_allow_insecure() {
        let plain = "[otlp]\nendpoint = \"HTTP://c:4318\"\n";
        let c = parse(&format!("{plain}[otlp.headers]\nx-api-key = \"k\"\n")).unwrap();
        let e = c.validate().unwrap_err();
        assert!(
            e.contains("in the clear") && e.contains("allow_insecure"),
            "{e}"
        );
        let c = parse(&format!(
            "{plain}allow_insecure = true\n[otlp.headers]\nx-api-key = \"k\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        // Without headers, plain HTTP is fine (a collector beside the daemon).
        parse(plain).unwrap().validate().unwrap();
    }
}
