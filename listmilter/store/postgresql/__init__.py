"""All of listmilter's state in one PostgreSQL database, shared by several MX hosts.

`store.backend: postgresql` keeps the lists there too; `store.backend: yaml`
with `store.dsn` keeps the lists in the config file and the rest (the overlay,
pending requests, bounce records, the site's keys) there.

    db.py       pools, transactions, errors, schema version and `upgrade`
    schema.py   the schema, step by step
    stores.py   PgStore, PgPendingDB, PgBounceDB, PgKeys: the SQLite classes' interface
    copy.py     `listmilter migrate`: a state folder's SQLite files into PostgreSQL
"""
