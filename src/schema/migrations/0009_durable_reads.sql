-- No table changes: durable.sql's read() and tick() got cheaper (read()
-- no longer calls snap_before(), a SQL function that was parsed and planned
-- again in every transaction; tick() returns the id it just inserted). Same
-- signatures and results, so older builds keep working.
SELECT 1;
