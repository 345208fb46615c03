-- The request log, one row per request (columns in LogRecord.to_row() order).
-- ReplacingMergeTree collapses rows sharing the sorting key, which ends in request_id, so a batch
-- replayed from the spool never double-counts once parts merge; until they do, count with FINAL
-- or uniqExact(request_id). Nullable only where NULL means "unknown" (an unpriced model's cost).
CREATE TABLE IF NOT EXISTS ${database}.${table} ${on_cluster}
(
    request_id UUID,
    started_at DateTime64(3, 'UTC'),
    latency_ms Float32,
    ttfb_ms Nullable(Float32),
    upstream_ms Nullable(Float32),
    gateway_ms Nullable(Float32),
    status UInt16,
    method LowCardinality(String),
    path String,
    target LowCardinality(String),
    model LowCardinality(String),
    user_id String,
    app_id LowCardinality(String),
    key_id LowCardinality(String),
    properties Map(LowCardinality(String), String),
    session_id String,
    session_path String,
    session_name String,
    params String CODEC(ZSTD(1)),
    request_body Nullable(String) CODEC(ZSTD(3)),
    request_truncated Bool,
    response_body Nullable(String) CODEC(ZSTD(3)),
    response_truncated Bool,
    prompt_tokens Nullable(UInt32),
    completion_tokens Nullable(UInt32),
    total_tokens Nullable(UInt32),
    cost_usd Nullable(Float64),
    cost_saved_usd Nullable(Float64),
    reserved_usd Nullable(Float64),
    cache LowCardinality(String),
    attempts UInt16,
    answered_by LowCardinality(String),
    error String,
    outcome LowCardinality(String),
    -- Lookups by id (admin "show request") and by session skip most granules.
    INDEX request_id_bloom request_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX session_id_bloom session_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ${engine}
PARTITION BY toYYYYMM(started_at)
ORDER BY (app_id, user_id, started_at, request_id)
${ttl}
SETTINGS ${settings};
