DROP TABLE outbox;
DROP TABLE payments;
