-- Secrets every host of a fleet must share when none was configured (the signing keys of events
-- tokens and webhooks): the first host to start creates each, the others read it.
CREATE TABLE server_secrets (
    name   TEXT  PRIMARY KEY,
    value  BYTEA NOT NULL
);
