"""`just bench`: async-pay against the database's own ceiling. See bench/README.md; run it as
`python3 bench/bench.py` or `python3 -m asyncpay_bench` from bench/."""
