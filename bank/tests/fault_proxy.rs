//! The fault proxy between aws-sdk-dynamodb (SDK retries off) and dynoxide's HTTP server: each
//! fault kind reaches the caller as the error a real storage fault would, and reaches storage, or
//! not, as its kind says.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use lockstep_bank::dynoxide_server::DynoxideServer;
use lockstep_bank::fault_proxy::{FaultConfig, FaultCounts, FaultKind, FaultProxy};

const TABLE: &str = "bank";
/// Far below the coordinator's 2 s so a delayed request times out quickly here.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);
/// Past `ATTEMPT_TIMEOUT`, as the default delay is past the coordinator's attempt timeout.
const DELAY: Duration = Duration::from_secs(1);
const _: () = assert!(DELAY.as_millis() > ATTEMPT_TIMEOUT.as_millis());
/// How long a test waits for a delayed write to land upstream after the caller gave up.
const DELAYED_WRITE_WAIT_MAX: Duration = Duration::from_secs(3);

type PutResult = Result<(), SdkError<PutItemError, aws_sdk_dynamodb::config::http::HttpResponse>>;

/// dynoxide's HTTP server on a loopback port, in memory; stops when dropped.
async fn start_upstream() -> DynoxideServer {
    let database = dynoxide::Database::memory().expect("dynoxide memory database");
    DynoxideServer::start(database)
        .await
        .expect("start dynoxide's HTTP server")
}

fn client(endpoint: &str, retry: RetryConfig) -> Client {
    let config = aws_sdk_dynamodb::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .http_client(lockstep_coordinator::storage::dynamodb::https_client())
        .endpoint_url(endpoint)
        .retry_config(retry)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
        .build();
    Client::from_conf(config)
}

async fn create_table(client: &Client) {
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("attribute definition")
    };
    let key = KeySchemaElement::builder()
        .attribute_name("pk")
        .key_type(KeyType::Hash)
        .build()
        .expect("key schema");
    client
        .create_table()
        .table_name(TABLE)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk"))
        .key_schema(key)
        .send()
        .await
        .expect("create table");
}

async fn put(client: &Client, key: &str) -> PutResult {
    client
        .put_item()
        .table_name(TABLE)
        .item("pk", AttributeValue::S(key.to_owned()))
        .item("cash", AttributeValue::N("100".to_owned()))
        .send()
        .await
        .map(|_| ())
}

async fn stored(client: &Client, key: &str) -> bool {
    client
        .get_item()
        .table_name(TABLE)
        .key("pk", AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item()
        .is_some()
}

/// dynoxide with the table, a proxy in front of it at `config`'s rate, a client through the
/// proxy and one straight to dynoxide (SDK retries off on both).
struct Setup {
    _upstream: DynoxideServer,
    proxy: FaultProxy,
    through_proxy: Client,
    direct: Client,
}

async fn setup(config: FaultConfig) -> Setup {
    let upstream = start_upstream().await;
    let rate = config.rate;
    let proxy = FaultProxy::start(upstream.endpoint().to_owned(), FaultConfig { rate: 0.0, ..config })
        .await
        .expect("start proxy");
    let through_proxy = client(&proxy.endpoint(), RetryConfig::disabled());
    // Setup runs fault-free, as a test's setup would; then the faults start.
    create_table(&through_proxy).await;
    proxy.set_rate(rate);
    let direct = client(upstream.endpoint(), RetryConfig::disabled());
    Setup {
        _upstream: upstream,
        proxy,
        through_proxy,
        direct,
    }
}

fn status(error: &SdkError<PutItemError, aws_sdk_dynamodb::config::http::HttpResponse>) -> Option<u16> {
    error.raw_response().map(|response| response.status().as_u16())
}

/// Faults counted besides `kind`: none.
fn assert_only(counts: FaultCounts, kind: FaultKind, expected: u64) {
    assert_eq!(counts.of(kind), expected, "{counts:?}");
    assert_eq!(counts.injected(), expected, "{counts:?}");
}

/// At rate 0 the proxy is transparent, and the SDK's pooled keep-alive connection is reused.
#[tokio::test]
async fn rate_zero_is_transparent() {
    let upstream = start_upstream().await;
    let proxy = FaultProxy::start(upstream.endpoint().to_owned(), FaultConfig::default())
        .await
        .expect("start proxy");
    let client = client(&proxy.endpoint(), RetryConfig::disabled());
    create_table(&client).await;
    for key in ["alice", "bob", "carol"] {
        put(&client, key).await.expect("put through the proxy");
        assert!(stored(&client, key).await, "{key} read back through the proxy");
    }
    let counts = proxy.counts();
    assert_eq!(counts.requests, 7, "{counts:?}");
    assert_eq!(counts.forwarded, 7, "{counts:?}");
    assert_eq!(counts.injected(), 0, "{counts:?}");
    assert_eq!(counts.upstream_failures, 0, "{counts:?}");
    assert_eq!(
        counts.connections, 1,
        "one pooled connection for every request: {counts:?}"
    );
    proxy.stop().await;
}

/// ServerError: a 500 InternalServerError, and storage never sees the write.
#[tokio::test]
async fn server_error_is_a_500_without_forwarding() {
    let setup = setup(FaultConfig::only(FaultKind::ServerError, 1.0)).await;
    let error = put(&setup.through_proxy, "alice").await.expect_err("injected 500");
    assert_eq!(status(&error), Some(500), "{}", DisplayErrorContext(&error));
    assert_eq!(error.code(), Some("InternalServerError"));
    assert_eq!(error.message(), Some("injected"));
    assert!(!stored(&setup.direct, "alice").await);
    let counts = setup.proxy.counts();
    assert_only(counts, FaultKind::ServerError, 1);
    assert_eq!(counts.forwarded, 1, "only the setup's CreateTable: {counts:?}");
}

/// Throttle: a 400 ProvisionedThroughputExceededException, then ThrottlingException, unforwarded.
#[tokio::test]
async fn throttle_alternates_both_codes_without_forwarding() {
    let setup = setup(FaultConfig::only(FaultKind::Throttle, 1.0)).await;
    let mut codes = Vec::new();
    for _ in 0..2 {
        let error = put(&setup.through_proxy, "alice").await.expect_err("injected throttle");
        assert_eq!(status(&error), Some(400), "{}", DisplayErrorContext(&error));
        codes.extend(error.code().map(str::to_owned));
    }
    assert_eq!(codes, ["ProvisionedThroughputExceededException", "ThrottlingException"]);
    assert!(!stored(&setup.direct, "alice").await);
    let counts = setup.proxy.counts();
    assert_only(counts, FaultKind::Throttle, 2);
    assert_eq!(counts.forwarded, 1, "only the setup's CreateTable: {counts:?}");
}

/// Delay: the caller's attempt times out, and the write still lands in storage afterwards.
#[tokio::test]
async fn delay_times_out_the_caller_and_applies_later() {
    let setup = setup(FaultConfig {
        delay: DELAY,
        ..FaultConfig::only(FaultKind::Delay, 1.0)
    })
    .await;
    let started = Instant::now();
    let error = put(&setup.through_proxy, "alice").await.expect_err("attempt timeout");
    assert!(
        matches!(error, SdkError::TimeoutError(_)),
        "{}",
        DisplayErrorContext(&error)
    );
    assert!(started.elapsed() < DELAY, "gave up after {:?}", started.elapsed());
    assert!(!stored(&setup.direct, "alice").await, "not before the delay has passed");

    let deadline = Instant::now() + DELAYED_WRITE_WAIT_MAX;
    while !stored(&setup.direct, "alice").await {
        assert!(Instant::now() < deadline, "the delayed write never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= DELAY);
    let counts = setup.proxy.counts();
    assert_only(counts, FaultKind::Delay, 1);
    assert_eq!(counts.forwarded, 2, "CreateTable and the delayed put: {counts:?}");
}

/// ResetBefore: a dispatch failure, storage never sees the write, and the client recovers.
#[tokio::test]
async fn reset_before_is_a_dispatch_failure_without_forwarding() {
    let setup = setup(FaultConfig::only(FaultKind::ResetBefore, 1.0)).await;
    let error = put(&setup.through_proxy, "alice").await.expect_err("connection reset");
    assert!(
        matches!(error, SdkError::DispatchFailure(_)),
        "{}",
        DisplayErrorContext(&error)
    );
    assert!(!stored(&setup.direct, "alice").await);
    let counts = setup.proxy.counts();
    assert_only(counts, FaultKind::ResetBefore, 1);
    assert_eq!(counts.forwarded, 1, "only the setup's CreateTable: {counts:?}");

    setup.proxy.set_rate(0.0);
    put(&setup.through_proxy, "alice")
        .await
        .expect("the same client works again once faults stop");
    assert!(stored(&setup.direct, "alice").await);
}

/// LostReply: the caller sees a failure, yet storage applied the write.
#[tokio::test]
async fn lost_reply_fails_the_caller_but_applies_the_write() {
    let setup = setup(FaultConfig::only(FaultKind::LostReply, 1.0)).await;
    let error = put(&setup.through_proxy, "alice").await.expect_err("reply lost");
    assert!(
        matches!(error, SdkError::DispatchFailure(_)),
        "{}",
        DisplayErrorContext(&error)
    );
    assert!(stored(&setup.direct, "alice").await, "applied upstream");
    setup.proxy.set_rate(0.0);
    assert!(
        stored(&setup.through_proxy, "alice").await,
        "and visible through the proxy"
    );
    let counts = setup.proxy.counts();
    assert_only(counts, FaultKind::LostReply, 1);
    assert_eq!(counts.forwarded, 3, "CreateTable, the put and the read: {counts:?}");
}

/// DescribeTable is exempt by default, so a health probe passes even at rate 1 of every kind.
#[tokio::test]
async fn describe_table_is_exempt_by_default() {
    let setup = setup(FaultConfig {
        rate: 1.0,
        ..FaultConfig::default()
    })
    .await;
    for _ in 0..10 {
        setup
            .through_proxy
            .describe_table()
            .table_name(TABLE)
            .send()
            .await
            .expect("describe table is never faulted");
    }
    assert_eq!(setup.proxy.counts().injected(), 0);
}

/// Once stopped, the proxy refuses connections, and it checks its configuration at start.
#[tokio::test]
async fn stop_closes_the_listener_and_bad_config_is_refused() {
    let upstream = start_upstream().await;
    let proxy = FaultProxy::start(upstream.endpoint().to_owned(), FaultConfig::default())
        .await
        .expect("start proxy");
    let address = proxy.endpoint().trim_start_matches("http://").to_owned();
    proxy.stop().await;
    assert!(tokio::net::TcpStream::connect(&address).await.is_err());

    let invalid_rate =
        FaultProxy::start(upstream.endpoint().to_owned(), FaultConfig::only(FaultKind::Delay, 1.5)).await;
    assert_eq!(invalid_rate.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    let invalid_upstream = FaultProxy::start("127.0.0.1:8000".to_owned(), FaultConfig::default()).await;
    assert_eq!(invalid_upstream.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
}

/// What the SDK's standard retries make of each fault at rate 1, with the coordinator's settings
/// (`storage::dynamodb`: 3 attempts of 2 s at most, 5 s in all, default backoff) and the default
/// 2.5 s delay: every kind is retried by the SDK itself, and a lost reply's write is applied
/// although the caller sees an error, which is why every coordinator write carries conditions.
/// Prints the figures with `--nocapture`.
#[tokio::test]
async fn sdk_retries_every_fault_kind() {
    for kind in FaultKind::ALL {
        let setup = setup(FaultConfig::only(kind, 1.0)).await;
        let retrying = Client::from_conf(
            setup
                .through_proxy
                .config()
                .to_builder()
                .retry_config(RetryConfig::standard().with_max_attempts(3))
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(1))
                        .operation_attempt_timeout(Duration::from_secs(2))
                        .operation_timeout(Duration::from_secs(5))
                        .build(),
                )
                .build(),
        );
        let before = setup.proxy.counts();
        let started = Instant::now();
        let result = put(&retrying, "alice").await;
        let elapsed = started.elapsed();
        let outcome = match &result {
            Ok(()) => "ok".to_owned(),
            Err(error) => format!("{}", DisplayErrorContext(error)).chars().take(160).collect(),
        };
        // Delayed attempts still in flight land within the delay.
        tokio::time::sleep(FaultConfig::default().delay + Duration::from_millis(300)).await;
        let after = setup.proxy.counts();
        let applied = stored(&setup.direct, "alice").await;
        println!(
            "{kind:?}: {} attempts, {} forwarded, in {elapsed:.2?}, applied: {applied}, outcome: {outcome}",
            after.requests - before.requests,
            after.forwarded - before.forwarded,
        );
        assert!(result.is_err(), "{kind:?}: every attempt is faulted at rate 1");
        assert!(
            after.requests - before.requests >= 2,
            "{kind:?}: the SDK retried by itself"
        );
        let reaches_storage = matches!(kind, FaultKind::Delay | FaultKind::LostReply);
        assert_eq!(applied, reaches_storage, "{kind:?}: applied upstream");
    }
}
