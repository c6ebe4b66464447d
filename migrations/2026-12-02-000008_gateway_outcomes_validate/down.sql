-- Nothing to undo: validating a constraint changes no data.
SELECT 1;
