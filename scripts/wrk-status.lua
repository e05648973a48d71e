-- wrk script for POST /video/status (see benches/bare_status.rs).
-- KEY: the API key (default: the benches' key); BODY: the request body.
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("KEY") or "bench-key-0123456789")
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BODY") or '{"requestId":"not-an-id"}'
