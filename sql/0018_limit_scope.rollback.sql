DROP FUNCTION pgjobs.limit_scope(text, text[]);
