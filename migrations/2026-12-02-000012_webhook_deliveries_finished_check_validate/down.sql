-- Nothing to undo: a validated constraint is the same constraint; 000011's down drops it.
SELECT 1;
