//! The declarative connector file format: what a user writes in `connectors/*.toml`.
//!
//! Every struct refuses unknown keys, and every field's doc comment is the user's
//! documentation of that key.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::duration::HumanDuration;

/// One connector file: one vendor system and its streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorSpec {
    /// The vendor system's name, e.g. `"stripe"`. Together with the record's id it is the
    /// record's identity in every destination table, so it must not change once data exists.
    pub source_system: String,
    /// The API's base URL; stream paths are joined to it. May use `${ENV}` references.
    pub base_url: String,
    /// How requests authenticate. Omit for public APIs.
    #[serde(default)]
    pub auth: Option<AuthSpec>,
    /// Requests per second allowed against this vendor (all streams together).
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Timeouts and retries.
    #[serde(default)]
    pub http: HttpSpec,
    /// Headers sent with every request (values may use `${ENV}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Query parameters sent with every request.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// The streams of this vendor, by name (e.g. `[streams.invoices]`).
    pub streams: BTreeMap<String, StreamSpec>,
}

/// Authentication of every request to the vendor. Secret values should be `${ENV}` or
/// `${file:/path}` references; they are held in a type that never prints.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token, e.g. `"${STRIPE_API_KEY}"`.
        token: String,
    },
    /// HTTP basic authentication.
    Basic {
        /// The user name.
        username: String,
        /// The password, e.g. `"${VENDOR_PASSWORD}"`.
        password: String,
    },
    /// An API key in a header or a query parameter.
    ApiKey {
        /// The header that carries the key (set this or `query_param`).
        #[serde(default)]
        header: Option<String>,
        /// The query parameter that carries the key (set this or `header`).
        #[serde(default)]
        query_param: Option<String>,
        /// The key, e.g. `"${VENDOR_API_KEY}"`.
        value: String,
    },
    /// OAuth2 client credentials: a token is fetched from `token_url`, cached, and fetched
    /// again when it expires or the vendor answers 401.
    Oauth2ClientCredentials {
        /// The token endpoint (absolute URL).
        token_url: String,
        /// The client id.
        client_id: String,
        /// The client secret, e.g. `"${VENDOR_CLIENT_SECRET}"`.
        client_secret: String,
        /// Space-separated scopes, if the vendor wants them.
        #[serde(default)]
        scope: Option<String>,
    },
}

/// A token bucket shared by all streams of the connector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Sustained requests per second.
    pub requests_per_second: u32,
    /// Requests allowed in a burst above the sustained rate (default: 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Timeouts and retries of vendor requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Time allowed for one request, response body included (default `"30s"`).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Attempts per request before the stream stops, first attempt included (default 5).
    /// Retried: connect errors, timeouts, 429 and 5xx.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; it doubles each attempt, with jitter (default `"500ms"`).
    /// A `Retry-After` from the vendor is honored when longer.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// Longest delay between two attempts (default `"60s"`).
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// Largest response body idem reads, in bytes (default 67108864, 64 MiB). It is
    /// enforced while the body streams in; a larger page fails its stream with an error
    /// naming the URL and the limit, before it can exhaust memory.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// What to do with a `next` link, `Link` header or redirect that points at another
    /// origin (scheme, host and port) than `base_url`: `"refuse"` (default) stops the
    /// stream with an error; `"without_credentials"` follows it with no auth, no API key
    /// and none of the connector's `headers`. Credentials never leave `base_url`'s origin.
    #[serde(default)]
    pub cross_host: CrossHost,
    /// A PEM file of CA certificates to trust for this vendor besides the bundled web PKI
    /// roots: a vendor behind a private CA, or a TLS-inspecting corporate proxy. Relative
    /// to the connector file.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// What a link or redirect to another origin than `base_url` gets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CrossHost {
    /// Stop the stream with an error naming the URL.
    #[default]
    Refuse,
    /// Follow it without any credential or configured header.
    WithoutCredentials,
}

impl Default for HttpSpec {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_response_bytes: default_max_response_bytes(),
            cross_host: CrossHost::default(),
            ca_file: None,
        }
    }
}

fn default_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(500))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_max_response_bytes() -> u64 {
    64 * 1024 * 1024
}

/// HTTP method of a stream's requests.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// Parameters go in the query string.
    #[default]
    Get,
    /// Parameters (pagination, window) go in the JSON body, e.g. search endpoints.
    Post,
}

/// One stream: one endpoint, one destination table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Path joined to the connector's `base_url`, e.g. `"/v1/invoices"`.
    pub path: String,
    /// `GET` (default) or `POST`.
    #[serde(default)]
    pub method: Method,
    /// Extra query parameters (GET) or top-level body fields (POST), e.g. `limit = "100"`.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    /// POST only: the JSON body. String values `"{{from}}"` and `"{{to}}"` are replaced by
    /// the window's bounds in the incremental `format` (`"0"` / omitted when unbounded).
    #[serde(default)]
    pub body: Option<toml::Value>,
    /// JSON pointer to the array of records in a response, e.g. `"/data"`; `""` when the
    /// response itself is the array.
    #[serde(default)]
    pub records: String,
    /// JSON pointer, inside each item of `records`, to the record to store, when the
    /// items are envelopes: `"/data/object"` stores the invoice an event is about, not the
    /// event. Pagination still reads the items (an event's id is the feed's cursor). An
    /// item without it is stored as a failure. Default: the item itself.
    #[serde(default)]
    pub record: Option<String>,
    /// JSON pointer, inside a record, to its id, e.g. `"/id"`.
    pub id: String,
    /// Where a record says when it last changed. Required by `high_water_mark`.
    #[serde(default)]
    pub updated_at: Option<TimeField>,
    /// How to get the next page.
    #[serde(default)]
    pub pagination: PaginationSpec,
    /// What a run fetches: everything, or only what changed since the last run.
    #[serde(default)]
    pub incremental: IncrementalSpec,
    /// Destination table (created if missing), e.g. `"invoices"`.
    pub table: String,
    /// Typed columns extracted from each record, besides the raw `data` jsonb.
    #[serde(default)]
    pub columns: Vec<ColumnSpec>,
    /// Reminder rules evaluated over this stream's table (see the notification ledger).
    #[serde(default)]
    pub notifications: Vec<crate::schema::notify::RuleSpec>,
    /// Extra request headers for this stream, sent only to `base_url`'s origin like the
    /// connector's `headers`; a value may use `{partition}`, e.g.
    /// `headers = { "Stripe-Account" = "{partition}" }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Walk the stream once per value of a static list (accounts, regions), each value
    /// with its own checkpoint, lock and resume point. `{partition}` in `path`, `params`
    /// values or `headers` is replaced by the value.
    #[serde(default)]
    pub partitions: Option<PartitionsSpec>,
    /// Makes this a child stream: walked once per parent record that a parent stream
    /// inserted or changed, with `{parent.id}` and `{parent/<pointer>}` in `path`,
    /// `params` and `body` taken from that parent record (see "Child streams" in
    /// docs/connectors.md).
    #[serde(default)]
    pub parent: Option<ParentSpec>,
}

/// `[streams.<name>.partitions]`: the values a stream is walked for, one after another.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionsSpec {
    /// The partition values, e.g. `["acct_1", "acct_2"]`: letters, digits, `_`, `-` and
    /// `.` only (they go into lock keys and URLs). `idem.toml` may replace the list per
    /// source with `[partitions.<source_system>] <stream> = [...]`.
    pub values: Vec<String>,
}

/// `[streams.<child>.parent]`: which parent records a child stream is walked for, and
/// how its rows relate to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentSpec {
    /// The parent streams of the same connector, e.g. `["invoices", "invoices_backfill"]`.
    /// A parent may not itself be a child stream.
    pub streams: Vec<String>,
    /// Conditions on the parent record, all of which must hold for its children to be
    /// walked, e.g. `[{ pointer = "/lines/has_more", eq = true }]`. Default: every
    /// inserted or changed parent.
    #[serde(default)]
    pub when: Vec<ParentCondition>,
    /// The child's id is unique only within its parent: the stored `source_id` becomes
    /// `<parent id>/<child id>`.
    #[serde(default)]
    pub id_unique_within_parent: bool,
    /// After a complete walk of one parent's children, mark that parent's stored children
    /// the vendor no longer returned as deleted (`deleted_at`). Never other parents'
    /// children, never after an interrupted walk.
    #[serde(default)]
    pub mark_deleted: bool,
    /// What a 404 on the child path (the parent is gone) means: `"keep"` (default) leaves
    /// the stored children as they are, `"delete_children"` marks them deleted. Either
    /// way the run does not fail.
    #[serde(default)]
    pub on_missing: OnMissing,
}

/// One condition on a parent record: the value at `pointer` equals `eq`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParentCondition {
    /// JSON pointer inside the parent record, e.g. `"/lines/has_more"`.
    pub pointer: String,
    /// The value it must equal (a string, number or boolean); a missing value never does.
    pub eq: toml::Value,
}

impl StreamSpec {
    /// The columns a reminder rule of this stream tests with `older_than`: a walk's end
    /// looks for records whose value crossed the threshold since its last pass, which an
    /// index on the column answers without reading the table.
    pub fn rule_threshold_columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        for condition in self.notifications.iter().flat_map(|rule| &rule.when) {
            if condition.older_than.is_some() && !columns.contains(&condition.column) {
                columns.push(condition.column.clone());
            }
        }
        columns
    }
}

impl ParentCondition {
    /// Whether `record` satisfies the condition.
    pub fn holds(&self, record: &serde_json::Value) -> bool {
        let Some(value) = record.pointer(&self.pointer) else {
            return false;
        };
        match (&self.eq, value) {
            (toml::Value::String(a), serde_json::Value::String(b)) => a == b,
            (toml::Value::Boolean(a), serde_json::Value::Bool(b)) => a == b,
            (toml::Value::Integer(a), serde_json::Value::Number(b)) => b.as_i64() == Some(*a),
            (toml::Value::Float(a), serde_json::Value::Number(b)) => b.as_f64() == Some(*a),
            _ => false,
        }
    }
}

/// What a 404 on a child path means.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// Leave the parent's stored children as they are.
    #[default]
    Keep,
    /// Mark the parent's stored children deleted.
    DeleteChildren,
}

/// A timestamp inside a record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeField {
    /// JSON pointer inside the record, e.g. `"/updated"`.
    pub pointer: String,
    /// How the value is written (default `rfc3339`).
    #[serde(default)]
    pub format: TimeFormat,
}

/// How a vendor writes a point in time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TimeFormat {
    /// Seconds since the Unix epoch (number or numeric string).
    UnixSeconds,
    /// Milliseconds since the Unix epoch (number or numeric string).
    UnixMillis,
    /// RFC 3339, e.g. `2026-11-01T12:00:00Z`.
    #[default]
    Rfc3339,
    /// A chrono format string, read as UTC, e.g. `"%Y-%m-%d %H:%M:%S"`.
    Custom(String),
}

impl<'de> Deserialize<'de> for TimeFormat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(match text.as_str() {
            "unix_seconds" => TimeFormat::UnixSeconds,
            "unix_millis" => TimeFormat::UnixMillis,
            "rfc3339" => TimeFormat::Rfc3339,
            custom if custom.contains('%') => {
                // chrono panics when formatting with a bad pattern: refuse it here, when the
                // connector is checked, not on the first window bound a run writes.
                let bad = chrono::format::StrftimeItems::new(custom)
                    .any(|item| matches!(item, chrono::format::Item::Error));
                if bad {
                    return Err(serde::de::Error::custom(format!(
                        "'{custom}' is not a valid chrono time format (see https://docs.rs/chrono/latest/chrono/format/strftime/)"
                    )));
                }
                TimeFormat::Custom(custom.to_string())
            }
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown time format '{other}': expected unix_seconds, unix_millis, rfc3339 or a chrono format like \"%Y-%m-%d %H:%M:%S\""
                )));
            }
        })
    }
}

/// How to walk the pages of a list endpoint. Every kind stops on an empty page.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PaginationSpec {
    /// One request returns everything.
    #[default]
    None,
    /// The response carries the next cursor (HubSpot: `cursor = "/paging/next/after"`,
    /// `param = "after"`). Stops when the cursor is absent. A cursor seen twice is an error.
    BodyCursor {
        /// JSON pointer to the next cursor in the response.
        cursor: String,
        /// Parameter that sends the cursor back.
        param: String,
    },
    /// The last record's id is the cursor (Stripe: `param = "starting_after"`,
    /// `has_more = "/has_more"`).
    LastRecord {
        /// Parameter that sends the cursor back.
        param: String,
        /// JSON pointer inside a record to its cursor value (default: the stream's `id`).
        #[serde(default)]
        field: Option<String>,
        /// JSON pointer to a boolean "more pages" flag; stops when false.
        #[serde(default)]
        has_more: Option<String>,
    },
    /// The first record's id is the cursor: a newest-first feed walked towards newer
    /// records (Stripe events: `param = "ending_before"`). The walk stops on an empty page
    /// only (a `has_more` flag is not trusted), so the last cursor kept is the newest
    /// record's. Each page is handed on oldest record first, so a record changed twice in
    /// one page keeps its newest version.
    FirstRecord {
        /// Parameter that sends the cursor back.
        param: String,
        /// JSON pointer inside a record to its cursor value, e.g. `"/id"` for an event's
        /// own id (default: the stream's `id`).
        #[serde(default)]
        field: Option<String>,
        /// Parameter that pages towards older records from a record's cursor (Stripe:
        /// `"starting_after"`). A replay needs it: it first finds the feed's oldest page
        /// by walking back, then walks forward from there as a regular run does.
        #[serde(default)]
        backward_param: Option<String>,
    },
    /// The response carries the next page's URL (absolute, or relative to `base_url`).
    NextUrl {
        /// JSON pointer to the URL; stops when absent or null.
        pointer: String,
    },
    /// RFC 8288 `Link: <url>; rel="next"` header; stops when absent.
    LinkHeader,
    /// Page numbers: `param=1`, `param=2`, … until an empty or short page.
    PageNumber {
        /// The page parameter (default `"page"`).
        #[serde(default = "default_page_param")]
        param: String,
        /// The first page's number (default 1).
        #[serde(default = "default_page_start")]
        start: u64,
        /// Page size; with it, a shorter page is the last one.
        #[serde(default)]
        page_size: Option<u64>,
    },
    /// Offsets: `offset=0&limit=N`, `offset=N`, … until an empty or short page.
    Offset {
        /// The offset parameter (default `"offset"`).
        #[serde(default = "default_offset_param")]
        param: String,
        /// The page-size parameter (default `"limit"`).
        #[serde(default = "default_limit_param")]
        limit_param: String,
        /// Records per page.
        limit: u64,
    },
}

fn default_page_param() -> String {
    "page".into()
}
fn default_page_start() -> u64 {
    1
}
fn default_offset_param() -> String {
    "offset".into()
}
fn default_limit_param() -> String {
    "limit".into()
}

/// What one run fetches, and the checkpoint that remembers where it got to.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum IncrementalSpec {
    /// Every run walks everything.
    Full {
        /// Mark rows the vendor no longer returns as deleted (`deleted_at`), after a walk
        /// that completed from its first page. A failed or partial walk deletes nothing.
        #[serde(default)]
        mark_deleted: bool,
    },
    /// An opaque vendor cursor (an events feed), kept across runs: each run continues from
    /// the last page's cursor. Needs `body_cursor`, `last_record` or `first_record`
    /// pagination.
    Cursor,
    /// The largest `updated_at` applied; the next run asks from `mark - overlap`, inclusive.
    HighWaterMark {
        /// Query parameter (GET) or body field (POST) carrying the lower bound, inclusive,
        /// e.g. `"updated[gte]"`. Omit when the POST `body` uses `"{{from}}"`.
        #[serde(default)]
        param: Option<String>,
        /// Parameter carrying the exclusive upper bound, for replays of a window
        /// (e.g. `"updated[lt]"`). Without it a replay filters records client-side.
        #[serde(default)]
        param_to: Option<String>,
        /// How the bounds are written in the request (default: `unix_seconds`).
        #[serde(default = "default_param_format")]
        format: TimeFormat,
        /// How far before the mark the next run starts, to catch late and out-of-order
        /// updates (default `"15m"`). The re-read records are no-ops.
        #[serde(default = "default_overlap")]
        overlap: HumanDuration,
        /// True when the vendor returns records in ascending `updated_at` order: the mark
        /// then advances page by page. Otherwise it advances only when the walk completes.
        #[serde(default)]
        sorted: bool,
        /// The vendor stops paging after this many results per query (HubSpot search:
        /// 10000). The query is restarted from the last committed mark when reached.
        /// Needs `sorted = true`.
        #[serde(default)]
        max_results_per_query: Option<u64>,
    },
}

impl Default for IncrementalSpec {
    fn default() -> Self {
        IncrementalSpec::Full {
            mark_deleted: false,
        }
    }
}

fn default_param_format() -> TimeFormat {
    TimeFormat::UnixSeconds
}
fn default_overlap() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(15 * 60))
}

/// A typed column of the destination table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name (lowercase letters, digits, `_`).
    pub name: String,
    /// JSON pointer inside the record, e.g. `"/amount_due"`.
    pub pointer: String,
    /// Postgres type.
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    /// For `timestamptz`/`date` columns: how the vendor writes the value (default `rfc3339`).
    #[serde(default)]
    pub format: Option<TimeFormat>,
}

/// The Postgres types a column may have. A value that does not fit sends its record to
/// the failures table; the rest of the page commits.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Text,
    Bigint,
    Integer,
    Numeric,
    #[serde(rename = "double precision", alias = "double")]
    Double,
    Boolean,
    Timestamptz,
    Date,
    Jsonb,
}

impl ColumnType {
    /// The type as written in SQL.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "numeric",
            ColumnType::Double => "double precision",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Date => "date",
            ColumnType::Jsonb => "jsonb",
        }
    }
}

/// `stream` as idem names one partition of it in logs, errors and lock keys:
/// `charges#acct_1`, or just `charges` when unpartitioned (`""`).
pub fn qualified(stream: &str, partition: &str) -> String {
    if partition.is_empty() {
        stream.to_string()
    } else {
        format!("{stream}#{partition}")
    }
}
