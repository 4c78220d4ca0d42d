-- No table changes: durable.sql's read() and tick() got cheaper per call.
-- read() no longer calls snap_before() (a SQL function, parsed and planned
-- again in every transaction), both keep generic plans (custom plans were
-- made again on every call once one channel held most rows), and tick()
-- returns the id it just inserted. Same signatures and results: older
-- builds keep working.
SELECT 1;
