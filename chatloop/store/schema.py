"""The feedback log's schema: numbered migrations, applied in order, each once, in a transaction.

Owns: ``MIGRATIONS`` (version, description, DDL). Invariants: a migration is never edited once
released; a change is a new migration with the next number.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE users (
            id VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL,            -- anonymous | api | import
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE conversations (
            id VARCHAR PRIMARY KEY,
            user_id VARCHAR NOT NULL,
            source VARCHAR NOT NULL,          -- ui | api | compare | import
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE messages (
            id VARCHAR PRIMARY KEY,
            conversation_id VARCHAR NOT NULL,
            role VARCHAR NOT NULL,            -- system | user | assistant
            content VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE generations (
            message_id VARCHAR PRIMARY KEY,   -- the assistant message
            context JSON NOT NULL,            -- the chat messages the reply answers
            context_hash VARCHAR NOT NULL,    -- groups replies to the same context
            model VARCHAR NOT NULL,
            adapter_version VARCHAR NOT NULL, -- 'base' or a registry version
            settings JSON NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            ttft_ms DOUBLE,
            latency_ms DOUBLE NOT NULL,
            finish_reason VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE feedback_seq;
        CREATE TABLE feedback_events (
            id BIGINT PRIMARY KEY DEFAULT nextval('feedback_seq'),
            message_id VARCHAR NOT NULL,
            user_id VARCHAR NOT NULL,
            rating SMALLINT NOT NULL CHECK (rating IN (-1, 1)),
            reason VARCHAR,
            comment VARCHAR,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE comparison_seq;
        CREATE TABLE comparisons (
            id BIGINT PRIMARY KEY DEFAULT nextval('comparison_seq'),
            message_a VARCHAR NOT NULL,
            message_b VARCHAR NOT NULL,
            choice VARCHAR NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
            user_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE run_seq;
        CREATE TABLE training_runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('run_seq'),
            algo VARCHAR NOT NULL,
            trigger VARCHAR NOT NULL,         -- cli | api | ui | <kind>:schedule-N | manual:schedule-N
            status VARCHAR NOT NULL,          -- chatloop.run_status.RunStatus: running | refused | failed | rejected | staged | promoted | overridden
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            parent_version VARCHAR NOT NULL,
            candidate_version VARCHAR,
            snapshot_dir VARCHAR,
            n_pairs INTEGER,
            n_eval_pairs INTEGER,
            feedback_ids JSON,                -- exactly which rows trained it
            comparison_ids JSON,
            settings JSON,
            metrics JSON,
            verdict VARCHAR,
            error VARCHAR
        );
        CREATE TABLE adapters (
            version VARCHAR PRIMARY KEY,
            parent VARCHAR NOT NULL,
            algo VARCHAR NOT NULL,
            run_id BIGINT,
            path VARCHAR NOT NULL,
            metrics JSON,
            created_at TIMESTAMP NOT NULL
        );
        CREATE SEQUENCE activation_seq;
        CREATE TABLE adapter_activations (
            id BIGINT PRIMARY KEY DEFAULT nextval('activation_seq'),
            version VARCHAR NOT NULL,
            previous VARCHAR NOT NULL,
            actor VARCHAR NOT NULL,           -- gate | operator | rollback | startup
            reason VARCHAR,
            activated_at TIMESTAMP NOT NULL
        );
        CREATE INDEX generations_context ON generations(context_hash);
        CREATE INDEX feedback_message ON feedback_events(message_id);
        """,
    ),
    (
        2,
        "retraining schedules",
        """
        CREATE SEQUENCE schedule_seq;
        CREATE TABLE schedules (
            id BIGINT PRIMARY KEY DEFAULT nextval('schedule_seq'),
            kind VARCHAR NOT NULL,            -- cron | interval | feedback
            spec VARCHAR NOT NULL,            -- crontab line | minutes | number of new events
            algo VARCHAR NOT NULL,            -- dpo | kto | ppo
            created_at TIMESTAMP NOT NULL,
            created_by VARCHAR NOT NULL,
            feedback_mark BIGINT NOT NULL,    -- feedback_count() when it last fired (or was made)
            last_fired_at TIMESTAMP,
            last_run_id BIGINT
        );
        ALTER TABLE training_runs ADD COLUMN override VARCHAR;  -- who promoted a rejected run, and why
        """,
    ),
    (
        3,
        "imported conversations: their origin, and a held-out mark that keeps them out of training",
        """
        ALTER TABLE conversations ADD COLUMN external_id VARCHAR;  -- e.g. oasst:<message id>, hh:<line>
        ALTER TABLE conversations ADD COLUMN held_out BOOLEAN NOT NULL DEFAULT false;
        CREATE INDEX conversations_external ON conversations(external_id);
        """,
    ),
    (
        4,
        "API keys an operator issues: the key is the caller's identity, with its own limits and cap",
        """
        CREATE TABLE api_keys (
            id VARCHAR PRIMARY KEY,           -- the public part of the key: clk_<id>_<secret>
            name VARCHAR NOT NULL,
            secret_sha256 VARCHAR NOT NULL,   -- the secret itself is shown once and never stored
            created_at TIMESTAMP NOT NULL,
            revoked_at TIMESTAMP,
            chat_per_minute INTEGER,          -- NULL: the service's [limits]
            feedback_per_minute INTEGER,
            max_pairs INTEGER                 -- NULL: [training] max_pairs_per_user
        );
        """,
    ),
    (
        5,
        "a user's deleted conversations: hidden from them, kept in the log, never trained on again",
        """
        ALTER TABLE conversations ADD COLUMN deleted_at TIMESTAMP;  -- set by its user; NULL while shown
        """,
    ),
]
