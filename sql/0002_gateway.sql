-- depends: 0001_initial
-- The HTTP gateway's API tokens.
--
-- Only a token's SHA-256 is stored: a leaked table (a backup, a replica, a support dump)
-- hands out no working credential. The token itself is printed once by
-- `pgjobs token create` and never again. A token is bound to exactly one company, and
-- that binding is the only place the gateway learns which company a caller acts for.

CREATE TABLE pgjobs.api_tokens (
    id          uuid        PRIMARY KEY,
    company_id  text        NOT NULL CHECK (length(company_id) BETWEEN 1 AND 200),
    token_hash  text        NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    label       text        CHECK (length(label) <= 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_tokens_company_idx ON pgjobs.api_tokens (company_id);
