-- The fleet's plugin swap history (plugins::swaps): per slot, the history document (the last
-- installs and which serves) and the components it names, so that an upload or a rollback on one
-- host reaches every host and survives their restarts. A row is written under FOR UPDATE, so two
-- hosts' admin actions on one slot take turns.
CREATE TABLE plugin_swap_history (
    slot     TEXT  PRIMARY KEY,
    history  BYTEA
);

CREATE TABLE plugin_swap_components (
    slot     TEXT  NOT NULL,
    sha256   TEXT  NOT NULL,
    bytes    BYTEA NOT NULL,
    PRIMARY KEY (slot, sha256)
);
