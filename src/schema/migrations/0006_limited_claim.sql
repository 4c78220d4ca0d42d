-- The limited claim's per-key scan asks for fewer candidates
-- (functions/limits.sql, since 6). No table changes: compatible with
-- level 1.
SELECT 1;
