DROP TABLE pgjobs.api_tokens;
