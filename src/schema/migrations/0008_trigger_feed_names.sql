-- The statement-level trigger function (functions/changes.sql, since 8)
-- works on tables with a column named r or like one of its variables (op,
-- xid, ts, ...): such a column made every write to the table fail, or
-- (r) published that column instead of the row. No table changes:
-- compatible with level 1.
SELECT 1;
