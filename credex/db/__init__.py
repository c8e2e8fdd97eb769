"""Storage: engines and sessions, tables, migrations."""

# The newest migration; a test checks it against Alembic's head. Kept here so that a command
# can check the schema without importing Alembic.
HEAD_REVISION = "0016_account_keys_by_trigger"
