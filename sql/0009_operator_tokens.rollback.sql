-- A schema without operators cannot hold their tokens: they are deleted (revoked ones too).
DELETE FROM pgjobs.api_tokens WHERE operator;
ALTER TABLE pgjobs.api_tokens DROP CONSTRAINT api_tokens_one_company_or_operator;
ALTER TABLE pgjobs.api_tokens ALTER COLUMN company_id SET NOT NULL;
ALTER TABLE pgjobs.api_tokens DROP COLUMN operator;
