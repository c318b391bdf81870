"""Append-only schema migrations. An applied migration is never edited; add a new one instead.

One ordered list for every backend: each entry has a name and its SQL in both dialects, SQLite's
and PostgreSQL's; a new migration must give both. Each backend applies them in order, each in its
own transaction, and records their names in ``schema_migrations``.

PostgreSQL's SQL differs where the dialects do: every text column is ``COLLATE "C"`` (lists then
sort in SQLite's byte order, whatever the database's collation); tables that lists order by
insertion (``rowid`` in SQLite) have a ``seq`` identity column; a CHECK changes with ALTER TABLE
instead of SQLite's table rebuild; triggers call a plpgsql function. Booleans stay INTEGER and
JSON stays TEXT in both, so rows decode the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration"]


@dataclass(frozen=True)
class Migration:
    name: str
    sqlite: str
    postgres: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_registry",
        """
        CREATE TABLE models (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            vendor TEXT NOT NULL DEFAULT '',
            description TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            UNIQUE (name, vendor)
        );
        CREATE INDEX models_name ON models (name);

        CREATE TABLE model_versions (
            id TEXT PRIMARY KEY,
            model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
            version TEXT NOT NULL,
            capabilities TEXT NOT NULL DEFAULT '{}',
            default_parameters TEXT,
            pinned INTEGER NOT NULL DEFAULT 0,
            last_used_at TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (model_id, version)
        );
        CREATE INDEX model_versions_model ON model_versions (model_id);
        CREATE INDEX model_versions_last_used ON model_versions (last_used_at);

        CREATE TABLE blobs (
            digest TEXT PRIMARY KEY,
            size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
            state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'quarantined')),
            created_at TEXT NOT NULL,
            last_verified_at TEXT
        );

        CREATE TABLE model_artifacts (
            id TEXT PRIMARY KEY,
            model_version_id TEXT NOT NULL REFERENCES model_versions (id) ON DELETE CASCADE,
            artifact_type TEXT NOT NULL,
            filename TEXT NOT NULL,
            sha256 TEXT NOT NULL REFERENCES blobs (digest),
            size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
            source_uri TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (model_version_id, filename)
        );
        CREATE INDEX model_artifacts_version ON model_artifacts (model_version_id);
        CREATE INDEX model_artifacts_sha256 ON model_artifacts (sha256);

        CREATE TABLE node_model_availability (
            id TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            model_version_id TEXT NOT NULL REFERENCES model_versions (id) ON DELETE CASCADE,
            status TEXT NOT NULL,
            last_checked_at TEXT NOT NULL,
            details TEXT,
            UNIQUE (node_id, model_version_id)
        );
        CREATE INDEX node_model_availability_node ON node_model_availability (node_id);

        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'error')),
            bytes INTEGER,
            duration_ms INTEGER,
            correlation_id TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_at ON audit_log (at);
        CREATE INDEX audit_log_action_at ON audit_log (action, at);

        CREATE TABLE preferences (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            updated_by TEXT NOT NULL
        );

        CREATE TABLE downloads (
            id TEXT PRIMARY KEY,
            ref TEXT NOT NULL,
            state TEXT NOT NULL CHECK (
                state IN ('pending', 'approved', 'running', 'done', 'failed', 'denied', 'cancelled')
            ),
            expected_digest TEXT,
            digest TEXT,
            bytes_done INTEGER NOT NULL DEFAULT 0,
            bytes_total INTEGER,
            requested_by TEXT NOT NULL,
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX downloads_state ON downloads (state, created_at);
        """,
        postgres="""
        CREATE TABLE models (
            id TEXT COLLATE "C" PRIMARY KEY,
            name TEXT COLLATE "C" NOT NULL,
            vendor TEXT COLLATE "C" NOT NULL DEFAULT '',
            description TEXT COLLATE "C",
            created_at TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL,
            updated_by TEXT COLLATE "C" NOT NULL,
            UNIQUE (name, vendor)
        );
        CREATE INDEX models_name ON models (name);

        CREATE TABLE model_versions (
            id TEXT COLLATE "C" PRIMARY KEY,
            model_id TEXT COLLATE "C" NOT NULL REFERENCES models (id) ON DELETE CASCADE,
            version TEXT COLLATE "C" NOT NULL,
            capabilities TEXT COLLATE "C" NOT NULL DEFAULT '{}',
            default_parameters TEXT COLLATE "C",
            pinned INTEGER NOT NULL DEFAULT 0,
            last_used_at TEXT COLLATE "C" NOT NULL,
            created_at TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL,
            UNIQUE (model_id, version)
        );
        CREATE INDEX model_versions_model ON model_versions (model_id);
        CREATE INDEX model_versions_last_used ON model_versions (last_used_at);

        CREATE TABLE blobs (
            digest TEXT COLLATE "C" PRIMARY KEY,
            size_bytes BIGINT NOT NULL CHECK (size_bytes >= 0),
            state TEXT COLLATE "C" NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'quarantined')),
            created_at TEXT COLLATE "C" NOT NULL,
            last_verified_at TEXT COLLATE "C"
        );

        CREATE TABLE model_artifacts (
            id TEXT COLLATE "C" PRIMARY KEY,
            model_version_id TEXT COLLATE "C" NOT NULL REFERENCES model_versions (id) ON DELETE CASCADE,
            artifact_type TEXT COLLATE "C" NOT NULL,
            filename TEXT COLLATE "C" NOT NULL,
            sha256 TEXT COLLATE "C" NOT NULL REFERENCES blobs (digest),
            size_bytes BIGINT NOT NULL CHECK (size_bytes >= 0),
            source_uri TEXT COLLATE "C",
            created_at TEXT COLLATE "C" NOT NULL,
            UNIQUE (model_version_id, filename)
        );
        CREATE INDEX model_artifacts_version ON model_artifacts (model_version_id);
        CREATE INDEX model_artifacts_sha256 ON model_artifacts (sha256);

        CREATE TABLE node_model_availability (
            id TEXT COLLATE "C" PRIMARY KEY,
            node_id TEXT COLLATE "C" NOT NULL,
            model_version_id TEXT COLLATE "C" NOT NULL REFERENCES model_versions (id) ON DELETE CASCADE,
            status TEXT COLLATE "C" NOT NULL,
            last_checked_at TEXT COLLATE "C" NOT NULL,
            details TEXT COLLATE "C",
            UNIQUE (node_id, model_version_id)
        );
        CREATE INDEX node_model_availability_node ON node_model_availability (node_id);

        CREATE TABLE audit_log (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            at TEXT COLLATE "C" NOT NULL,
            actor TEXT COLLATE "C" NOT NULL,
            action TEXT COLLATE "C" NOT NULL,
            target TEXT COLLATE "C" NOT NULL DEFAULT '',
            outcome TEXT COLLATE "C" NOT NULL CHECK (outcome IN ('ok', 'error')),
            bytes BIGINT,
            duration_ms BIGINT,
            correlation_id TEXT COLLATE "C" NOT NULL,
            detail TEXT COLLATE "C" NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_at ON audit_log (at);
        CREATE INDEX audit_log_action_at ON audit_log (action, at);

        CREATE TABLE preferences (
            key TEXT COLLATE "C" PRIMARY KEY,
            value TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL,
            updated_by TEXT COLLATE "C" NOT NULL
        );

        CREATE TABLE downloads (
            id TEXT COLLATE "C" PRIMARY KEY,
            ref TEXT COLLATE "C" NOT NULL,
            state TEXT COLLATE "C" NOT NULL CONSTRAINT downloads_state_check CHECK (
                state IN ('pending', 'approved', 'running', 'done', 'failed', 'denied', 'cancelled')
            ),
            expected_digest TEXT COLLATE "C",
            digest TEXT COLLATE "C",
            bytes_done BIGINT NOT NULL DEFAULT 0,
            bytes_total BIGINT,
            requested_by TEXT COLLATE "C" NOT NULL,
            error TEXT COLLATE "C",
            created_at TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL,
            seq BIGINT GENERATED ALWAYS AS IDENTITY
        );
        CREATE INDEX downloads_state ON downloads (state, created_at);
        """,
    ),
    Migration(
        "0002_inference_requests",
        """
        CREATE TABLE inference_requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            engine TEXT NOT NULL,
            node TEXT NOT NULL,
            reason TEXT NOT NULL,
            outcome TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            duration_ms INTEGER NOT NULL,
            correlation_id TEXT NOT NULL
        );
        CREATE INDEX inference_requests_at ON inference_requests (at);
        CREATE INDEX inference_requests_model_at ON inference_requests (model, at);
        """,
        postgres="""
        CREATE TABLE inference_requests (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            at TEXT COLLATE "C" NOT NULL,
            model TEXT COLLATE "C" NOT NULL,
            endpoint TEXT COLLATE "C" NOT NULL,
            engine TEXT COLLATE "C" NOT NULL,
            node TEXT COLLATE "C" NOT NULL,
            reason TEXT COLLATE "C" NOT NULL,
            outcome TEXT COLLATE "C" NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            duration_ms BIGINT NOT NULL,
            correlation_id TEXT COLLATE "C" NOT NULL
        );
        CREATE INDEX inference_requests_at ON inference_requests (at);
        CREATE INDEX inference_requests_model_at ON inference_requests (model, at);
        """,
    ),
    Migration(
        "0003_download_progress",
        """
        ALTER TABLE downloads ADD COLUMN model_name TEXT;
        ALTER TABLE downloads ADD COLUMN rate_bytes_per_s INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE downloads ADD COLUMN decided_by TEXT;
        CREATE INDEX downloads_ref ON downloads (ref, created_at);
        """,
        postgres="""
        ALTER TABLE downloads ADD COLUMN model_name TEXT COLLATE "C";
        ALTER TABLE downloads ADD COLUMN rate_bytes_per_s BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE downloads ADD COLUMN decided_by TEXT COLLATE "C";
        CREATE INDEX downloads_ref ON downloads (ref, created_at);
        """,
    ),
    Migration(
        "0004_download_queued_state",
        """
        CREATE TABLE downloads_new (
            id TEXT PRIMARY KEY,
            ref TEXT NOT NULL,
            state TEXT NOT NULL CHECK (
                state IN ('pending', 'approved', 'queued', 'running', 'done', 'failed', 'denied', 'cancelled')
            ),
            expected_digest TEXT,
            digest TEXT,
            bytes_done INTEGER NOT NULL DEFAULT 0,
            bytes_total INTEGER,
            requested_by TEXT NOT NULL,
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model_name TEXT,
            rate_bytes_per_s INTEGER NOT NULL DEFAULT 0,
            decided_by TEXT
        );
        INSERT INTO downloads_new (id, ref, state, expected_digest, digest, bytes_done, bytes_total,
            requested_by, error, created_at, updated_at, model_name, rate_bytes_per_s, decided_by)
        SELECT id, ref, state, expected_digest, digest, bytes_done, bytes_total,
            requested_by, error, created_at, updated_at, model_name, rate_bytes_per_s, decided_by
        FROM downloads;
        DROP TABLE downloads;
        ALTER TABLE downloads_new RENAME TO downloads;
        CREATE INDEX downloads_state ON downloads (state, created_at);
        CREATE INDEX downloads_ref ON downloads (ref, created_at);
        """,
        postgres="""
        ALTER TABLE downloads DROP CONSTRAINT downloads_state_check;
        ALTER TABLE downloads ADD CONSTRAINT downloads_state_check CHECK (
            state IN ('pending', 'approved', 'queued', 'running', 'done', 'failed', 'denied', 'cancelled')
        );
        """,
    ),
    Migration(
        "0005_blob_link_stat",
        """
        ALTER TABLE blobs ADD COLUMN link_stat TEXT;
        """,
        postgres="""
        ALTER TABLE blobs ADD COLUMN link_stat TEXT COLLATE "C";
        """,
    ),
    Migration(
        "0006_download_interrupted_state",
        """
        CREATE TABLE downloads_new (
            id TEXT PRIMARY KEY,
            ref TEXT NOT NULL,
            state TEXT NOT NULL CHECK (
                state IN ('pending', 'approved', 'queued', 'running', 'done', 'failed', 'denied', 'cancelled',
                    'interrupted')
            ),
            expected_digest TEXT,
            digest TEXT,
            bytes_done INTEGER NOT NULL DEFAULT 0,
            bytes_total INTEGER,
            requested_by TEXT NOT NULL,
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model_name TEXT,
            rate_bytes_per_s INTEGER NOT NULL DEFAULT 0,
            decided_by TEXT,
            error_code TEXT,
            note TEXT
        );
        INSERT INTO downloads_new (id, ref, state, expected_digest, digest, bytes_done, bytes_total,
            requested_by, error, created_at, updated_at, model_name, rate_bytes_per_s, decided_by)
        SELECT id, ref, state, expected_digest, digest, bytes_done, bytes_total,
            requested_by, error, created_at, updated_at, model_name, rate_bytes_per_s, decided_by
        FROM downloads;
        DROP TABLE downloads;
        ALTER TABLE downloads_new RENAME TO downloads;
        CREATE INDEX downloads_state ON downloads (state, created_at);
        CREATE INDEX downloads_ref ON downloads (ref, created_at);
        """,
        postgres="""
        ALTER TABLE downloads DROP CONSTRAINT downloads_state_check;
        ALTER TABLE downloads ADD CONSTRAINT downloads_state_check CHECK (
            state IN ('pending', 'approved', 'queued', 'running', 'done', 'failed', 'denied', 'cancelled',
                'interrupted')
        );
        ALTER TABLE downloads ADD COLUMN error_code TEXT COLLATE "C";
        ALTER TABLE downloads ADD COLUMN note TEXT COLLATE "C";
        """,
    ),
    Migration(
        "0007_users_and_api_keys",
        """
        CREATE TABLE users (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('admin', 'user', 'node')),
            password_hash TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );

        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            secret_sha256 TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL CHECK (role IN ('admin', 'user', 'node')),
            user_name TEXT REFERENCES users (name) ON DELETE CASCADE,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT,
            last_used_at TEXT,
            revoked_at TEXT
        );
        CREATE INDEX api_keys_user ON api_keys (user_name);
        """,
        postgres="""
        CREATE TABLE users (
            name TEXT COLLATE "C" PRIMARY KEY,
            role TEXT COLLATE "C" NOT NULL CHECK (role IN ('admin', 'user', 'node')),
            password_hash TEXT COLLATE "C",
            created_at TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL
        );

        CREATE TABLE api_keys (
            id TEXT COLLATE "C" PRIMARY KEY,
            name TEXT COLLATE "C" NOT NULL,
            prefix TEXT COLLATE "C" NOT NULL,
            secret_sha256 TEXT COLLATE "C" NOT NULL UNIQUE,
            role TEXT COLLATE "C" NOT NULL CHECK (role IN ('admin', 'user', 'node')),
            user_name TEXT COLLATE "C" REFERENCES users (name) ON DELETE CASCADE,
            created_by TEXT COLLATE "C" NOT NULL,
            created_at TEXT COLLATE "C" NOT NULL,
            expires_at TEXT COLLATE "C",
            last_used_at TEXT COLLATE "C",
            revoked_at TEXT COLLATE "C",
            seq BIGINT GENERATED ALWAYS AS IDENTITY
        );
        CREATE INDEX api_keys_user ON api_keys (user_name);
        """,
    ),
    Migration(
        "0008_login_sessions",
        """
        CREATE TABLE login_sessions (
            id_sha256 TEXT PRIMARY KEY,
            user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
            csrf_token TEXT NOT NULL,
            address TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL
        );
        CREATE INDEX login_sessions_user ON login_sessions (user_name);
        CREATE INDEX login_sessions_expiry ON login_sessions (expires_at);
        """,
        postgres="""
        CREATE TABLE login_sessions (
            id_sha256 TEXT COLLATE "C" PRIMARY KEY,
            user_name TEXT COLLATE "C" NOT NULL REFERENCES users (name) ON DELETE CASCADE,
            csrf_token TEXT COLLATE "C" NOT NULL,
            address TEXT COLLATE "C" NOT NULL,
            created_at TEXT COLLATE "C" NOT NULL,
            expires_at TEXT COLLATE "C" NOT NULL
        );
        CREATE INDEX login_sessions_user ON login_sessions (user_name);
        CREATE INDEX login_sessions_expiry ON login_sessions (expires_at);
        """,
    ),
    Migration(
        "0009_registry_generation",
        # One counter every write that changes what a model list shows bumps, whichever process
        # writes: a server caches its lists until it moves. Using a model (last_used_at) does not.
        """
        CREATE TABLE registry_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL
        );
        INSERT INTO registry_generation (id, generation) VALUES (1, 0);
        CREATE TRIGGER models_inserted AFTER INSERT ON models
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER models_updated AFTER UPDATE ON models
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER models_deleted AFTER DELETE ON models
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER model_versions_inserted AFTER INSERT ON model_versions
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER model_versions_updated
            AFTER UPDATE OF model_id, version, capabilities, default_parameters, pinned, created_at,
            updated_at ON model_versions
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER model_versions_deleted AFTER DELETE ON model_versions
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER model_artifacts_inserted AFTER INSERT ON model_artifacts
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER model_artifacts_updated AFTER UPDATE ON model_artifacts
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER model_artifacts_deleted AFTER DELETE ON model_artifacts
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        CREATE TRIGGER blobs_state_updated AFTER UPDATE OF state, size_bytes ON blobs
            WHEN OLD.state IS NOT NEW.state OR OLD.size_bytes IS NOT NEW.size_bytes
            BEGIN UPDATE registry_generation SET generation = generation + 1; END;
        """,
        postgres="""
        CREATE TABLE registry_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation BIGINT NOT NULL
        );
        INSERT INTO registry_generation (id, generation) VALUES (1, 0);
        CREATE FUNCTION registry_generation_bump() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE registry_generation SET generation = generation + 1;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER models_inserted AFTER INSERT ON models FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER models_updated AFTER UPDATE ON models FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER models_deleted AFTER DELETE ON models FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER model_versions_inserted AFTER INSERT ON model_versions FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER model_versions_updated
            AFTER UPDATE OF model_id, version, capabilities, default_parameters, pinned, created_at,
            updated_at ON model_versions FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER model_versions_deleted AFTER DELETE ON model_versions FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER model_artifacts_inserted AFTER INSERT ON model_artifacts FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER model_artifacts_updated AFTER UPDATE ON model_artifacts FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER model_artifacts_deleted AFTER DELETE ON model_artifacts FOR EACH ROW
            EXECUTE FUNCTION registry_generation_bump();
        CREATE TRIGGER blobs_state_updated AFTER UPDATE OF state, size_bytes ON blobs FOR EACH ROW
            WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.size_bytes IS DISTINCT FROM NEW.size_bytes)
            EXECUTE FUNCTION registry_generation_bump();
        """,
    ),
    Migration(
        "0010_tasks",
        # A task's output lives in files under the data dir (tasks/<id>/), not here. The
        # idempotency key is unique per actor; rows without one never collide (NULLs are distinct).
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            mode TEXT NOT NULL CHECK (mode IN ('prompt', 'script', 'commands')),
            text TEXT NOT NULL,
            model TEXT,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires_at TEXT,
            idempotency_key TEXT,
            actor TEXT NOT NULL,
            limits TEXT NOT NULL DEFAULT '{}',
            result TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            UNIQUE (actor, idempotency_key)
        );
        CREATE INDEX tasks_state ON tasks (state, created_at);
        CREATE INDEX tasks_actor ON tasks (actor, created_at);
        """,
        postgres="""
        CREATE TABLE tasks (
            id TEXT COLLATE "C" PRIMARY KEY,
            mode TEXT COLLATE "C" NOT NULL CHECK (mode IN ('prompt', 'script', 'commands')),
            text TEXT COLLATE "C" NOT NULL,
            model TEXT COLLATE "C",
            state TEXT COLLATE "C" NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT COLLATE "C",
            lease_expires_at TEXT COLLATE "C",
            idempotency_key TEXT COLLATE "C",
            actor TEXT COLLATE "C" NOT NULL,
            limits TEXT COLLATE "C" NOT NULL DEFAULT '{}',
            result TEXT COLLATE "C",
            created_at TEXT COLLATE "C" NOT NULL,
            started_at TEXT COLLATE "C",
            finished_at TEXT COLLATE "C",
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            UNIQUE (actor, idempotency_key)
        );
        CREATE INDEX tasks_state ON tasks (state, created_at, seq);
        CREATE INDEX tasks_actor ON tasks (actor, created_at);
        """,
    ),
    Migration(
        "0011_cluster",
        # 0001's node_model_availability was a placeholder nothing wrote: replaced by one keyed by
        # digest (a worker reports what it holds, by digest). Node state is derived, not stored.
        """
        DROP TABLE node_model_availability;

        CREATE TABLE join_tokens (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            expires_at TEXT,
            revoked_at TEXT,
            uses INTEGER NOT NULL DEFAULT 0
        );

        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            credential_hash TEXT NOT NULL UNIQUE,
            joined_at TEXT NOT NULL,
            token_id TEXT,
            drained INTEGER NOT NULL DEFAULT 0,
            last_heartbeat_at TEXT,
            capabilities TEXT NOT NULL DEFAULT '{}',
            load TEXT NOT NULL DEFAULT '{}',
            config TEXT NOT NULL DEFAULT '{}',
            config_version TEXT NOT NULL,
            config_applied TEXT
        );

        CREATE TABLE node_model_availability (
            node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
            digest TEXT NOT NULL,
            model TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('cached', 'loading', 'available', 'failed')),
            reason TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (node_id, digest)
        );
        """,
        postgres="""
        DROP TABLE node_model_availability;

        CREATE TABLE join_tokens (
            id TEXT COLLATE "C" PRIMARY KEY,
            secret_hash TEXT COLLATE "C" NOT NULL,
            created_at TEXT COLLATE "C" NOT NULL,
            created_by TEXT COLLATE "C" NOT NULL,
            expires_at TEXT COLLATE "C",
            revoked_at TEXT COLLATE "C",
            uses INTEGER NOT NULL DEFAULT 0,
            seq BIGINT GENERATED ALWAYS AS IDENTITY
        );

        CREATE TABLE nodes (
            id TEXT COLLATE "C" PRIMARY KEY,
            name TEXT COLLATE "C" NOT NULL UNIQUE,
            credential_hash TEXT COLLATE "C" NOT NULL UNIQUE,
            joined_at TEXT COLLATE "C" NOT NULL,
            token_id TEXT COLLATE "C",
            drained INTEGER NOT NULL DEFAULT 0,
            last_heartbeat_at TEXT COLLATE "C",
            capabilities TEXT COLLATE "C" NOT NULL DEFAULT '{}',
            load TEXT COLLATE "C" NOT NULL DEFAULT '{}',
            config TEXT COLLATE "C" NOT NULL DEFAULT '{}',
            config_version TEXT COLLATE "C" NOT NULL,
            config_applied TEXT COLLATE "C"
        );

        CREATE TABLE node_model_availability (
            node_id TEXT COLLATE "C" NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
            digest TEXT COLLATE "C" NOT NULL,
            model TEXT COLLATE "C" NOT NULL,
            state TEXT COLLATE "C" NOT NULL CHECK (state IN ('cached', 'loading', 'available', 'failed')),
            reason TEXT COLLATE "C",
            updated_at TEXT COLLATE "C" NOT NULL,
            PRIMARY KEY (node_id, digest)
        );
        """,
    ),
    Migration(
        "0012_servers",
        # The servers sharing this database (several on PostgreSQL): where peers reach each one,
        # and its credential for their blob routes. One row per data dir (its id is kept there);
        # alive while last_seen_at is recent. Which blobs a server holds is not stored: its peers
        # ask it (HEAD of the blob route), so no second record can drift from its disk.
        """
        CREATE TABLE servers (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            credential_hash TEXT NOT NULL UNIQUE,
            ca_pem TEXT,
            version TEXT NOT NULL,
            started_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL
        );
        """,
        postgres="""
        CREATE TABLE servers (
            id TEXT COLLATE "C" PRIMARY KEY,
            url TEXT COLLATE "C" NOT NULL,
            credential_hash TEXT COLLATE "C" NOT NULL UNIQUE,
            ca_pem TEXT COLLATE "C",
            version TEXT COLLATE "C" NOT NULL,
            started_at TEXT COLLATE "C" NOT NULL,
            last_seen_at TEXT COLLATE "C" NOT NULL
        );
        """,
    ),
    Migration(
        "0013_task_servers",
        # Several servers share one queue, each keeping task files in its own data dir: a task's
        # attachments are on the server it was created on (only that one, or its workers, runs it);
        # its output is on the server that last claimed it (another server says where to read it).
        """
        ALTER TABLE tasks ADD COLUMN attachments_on TEXT;
        ALTER TABLE tasks ADD COLUMN ran_on TEXT;
        """,
        postgres="""
        ALTER TABLE tasks ADD COLUMN attachments_on TEXT COLLATE "C";
        ALTER TABLE tasks ADD COLUMN ran_on TEXT COLLATE "C";
        """,
    ),
    Migration(
        "0014_providers",
        # External providers (REQ-MODELS-0113): what they serve and who may reach them. Their keys
        # sit apart, encrypted with a key kept outside the database, and no API reads them back.
        """
        CREATE TABLE providers (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            base_url TEXT NOT NULL,
            models TEXT NOT NULL DEFAULT '[]',
            operations TEXT NOT NULL DEFAULT '[]',
            subjects TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE provider_credentials (
            provider TEXT PRIMARY KEY REFERENCES providers(name) ON DELETE CASCADE,
            ciphertext BLOB NOT NULL,
            set_at TEXT NOT NULL
        );
        """,
        postgres="""
        CREATE TABLE providers (
            name TEXT COLLATE "C" PRIMARY KEY,
            kind TEXT COLLATE "C" NOT NULL,
            base_url TEXT COLLATE "C" NOT NULL,
            models TEXT COLLATE "C" NOT NULL DEFAULT '[]',
            operations TEXT COLLATE "C" NOT NULL DEFAULT '[]',
            subjects TEXT COLLATE "C" NOT NULL DEFAULT '[]',
            created_at TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL
        );
        CREATE TABLE provider_credentials (
            provider TEXT COLLATE "C" PRIMARY KEY REFERENCES providers(name) ON DELETE CASCADE,
            ciphertext BYTEA NOT NULL,
            set_at TEXT COLLATE "C" NOT NULL
        );
        """,
    ),
)
