-- depends: 0008_fair_claim
-- Operator tokens (issue 15): an API token that acts for every company, for the people
-- who run the queue. It has no company_id; the company is still named by each request's
-- path, so every route, log line and stream token stays scoped to one company. Stored
-- like any token: its SHA-256 only.
ALTER TABLE pgjobs.api_tokens ADD COLUMN operator boolean NOT NULL DEFAULT false;
ALTER TABLE pgjobs.api_tokens ALTER COLUMN company_id DROP NOT NULL;
ALTER TABLE pgjobs.api_tokens ADD CONSTRAINT api_tokens_one_company_or_operator
    CHECK ((company_id IS NULL) = operator);
