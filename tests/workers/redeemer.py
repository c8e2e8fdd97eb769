"""A process that redeems as fast as it can once told to start: the racing shopper.

usage: python -m tests.workers.redeemer DATABASE_URL GO_FILE USER_ID SKU ATTEMPTS
Prints one line per attempt: "ok <redemption_id>" or "refused <code>".
"""

import sys
import time
from pathlib import Path


def main() -> None:
    url, go_file, user_id, sku, attempts = sys.argv[1:6]
    from credex.db.engine import session_for
    from credex.errors import CredexError
    from credex.points.redemptions import redeem

    deadline = time.monotonic() + 60
    while not Path(go_file).exists():  # a barrier: every racer starts at once
        if time.monotonic() > deadline:
            sys.exit("never told to start")
        time.sleep(0.005)
    for _ in range(int(attempts)):
        try:
            with session_for(url, write=True) as session:
                result = redeem(session, user_id, sku, address="1 Race Street", operator="racer")
            print("ok", result["redemption_id"], flush=True)
        except CredexError as error:
            print("refused", error.code, flush=True)


if __name__ == "__main__":
    main()
