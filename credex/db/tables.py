"""The table handles every module uses: one name per table, taken once from the schema in
``models`` (the SQLModel classes declare the columns, constraints and indexes; the code reads and
writes through SQLAlchemy Core on these handles)."""

from __future__ import annotations

from credex.db import models

account = models.Account.__table__
ledger_entry = models.LedgerEntry.__table__
point_lot = models.PointLot.__table__
lot_use = models.LotUse.__table__
catalog_item = models.CatalogItem.__table__
redemption = models.Redemption.__table__
outbox_message = models.OutboxMessage.__table__
outbox_claim_mark = models.OutboxClaimMark.__table__
shipment_request = models.ShipmentRequest.__table__
redemption_event = models.RedemptionEvent.__table__
stock_movement = models.StockMovement.__table__

metadata = models.metadata
