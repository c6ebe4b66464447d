-- GET /api/v1/payments lists a merchant's payments newest first with a (created_at, id) cursor:
-- this index serves the filter, the order and the cursor comparison at any table size.
CREATE INDEX payments_merchant_created_idx ON payments (merchant, created_at DESC, id DESC);
