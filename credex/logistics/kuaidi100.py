"""kuaidi100's real-time query API (实时查询): tracking only.

A form POST of ``customer``, ``param`` (a JSON string) and ``sign`` (upper-case hex MD5 of
``param + key + customer``, over exactly the ``param`` string sent). Failures arrive as HTTP 200
with ``{"result": false, "returnCode": "…", "message": "…"}``; a success says ``"status": "200"``
and ``"message": "ok"`` and echoes the parcel asked (``com``, ``nu``), and an answer that is
neither is ``InvalidCarrierAnswer``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
from pydantic import SecretStr

from credex.errors import CarrierNotConfigured, json_object
from credex.logistics.model import (
    CancelResult,
    CarrierClient,
    CarrierError,
    CarrierKeyRefused,
    CarrierRefusal,
    CarrierUnreachable,
    Checkpoint,
    InvalidCarrierAnswer,
    ParcelNotFound,
    Tracking,
    Waybill,
    clean_text,
    echo_problem,
    in_utc,
    shown,
)
from credex.logistics.retrying import RetryingHttp

KUAIDI100_URL = "https://poll.kuaidi100.com"
QUERY_PATH = "/poll/query.do"
CHINA_TIME = timezone(timedelta(hours=8), "CST")  # kuaidi100's times carry no offset

# `state` of the parcel, and `statusCode` of a checkpoint (resultv2=1 adds the three- and
# four-digit sub-states), onto the normalised statuses (logistics.md). Only `returned` and
# `delivered` are final, so a code lands there only when the parcel has stopped for good.
STATES = {
    "0": "in_transit",  # 在途
    "1": "in_transit",  # 揽收: picked up
    "2": "exception",  # 疑难: a problem
    "3": "delivered",  # 签收
    "4": "returned",  # 退签: returned and signed for by the sender (final: the redemption is refunded)
    "5": "out_for_delivery",  # 派件
    "6": "exception",  # 退回: being returned, still on its way back (not final until 4)
    "7": "in_transit",  # 转投: forwarded to another carrier
    "8": "in_transit",  # 清关: customs (the parent of 10-13)
    "10": "in_transit",  # 待清关
    "11": "in_transit",  # 清关中
    "12": "in_transit",  # 已清关
    "13": "exception",  # 清关异常: a customs problem
    "14": "exception",  # 拒签: refused by the recipient; the parcel goes back (6, then 4)
    "101": "info_received",  # 已下单: ordered, not picked up
    "102": "info_received",  # 待揽收
    "103": "in_transit",  # 已揽收
    "204": "failed_attempt",  # 派件异常
    "206": "failed_attempt",  # 无法联系: the recipient could not be reached
    "401": "exception",  # 已销单: the waybill was cancelled; no parcel left, so not a return
    "501": "available_for_pickup",  # 投柜或驿站: in a locker or a pick-up station
}
# A checkpoint's `status` in words, when it has no `statusCode`.
STATE_WORDS = {
    "在途": "in_transit",
    "揽收": "in_transit",
    "疑难": "exception",
    "签收": "delivered",
    "退签": "returned",
    "派件": "out_for_delivery",
    "退回": "exception",
    "转投": "in_transit",
    "转单": "in_transit",
    "清关": "in_transit",
    "待清关": "in_transit",
    "清关中": "in_transit",
    "已清关": "in_transit",
    "清关异常": "exception",
    "拒签": "exception",
    "销单": "exception",
    "已销单": "exception",
}

RETRYABLE_CODES = {"501", "502"}  # kuaidi100's own server errors


def kuaidi100_status(code: object) -> str:
    """The normalised status of a ``state`` or ``statusCode`` (text or a whole number).

    A sub-state it does not list takes its parent's: a three-digit code its first digit's
    (``304`` → ``3``), a four-digit one its first two digits' (``1401`` → ``14``), ``10xx`` the
    trunk's (``0``). Except a return: only state 4 itself says the parcel is back with the sender
    and signed for, and that refunds the redemption. The sub-states kuaidi100 lists beside it (401
    cancelled, 14 refused) are not returns, so one it does not list (``402``) is not known to be
    one either: ``exception``, for a person to look at, never a refund on a guess. A state not known
    at all counts as in transit: kuaidi100 has the parcel, and its words say the rest. Anything
    else (a list, an object, true) is ``ValueError``.
    """
    if isinstance(code, bool) or not isinstance(code, str | int):
        raise ValueError(f"not a kuaidi100 state: {shown(code)}")
    text = str(code).strip()
    if text in STATES:
        return STATES[text]
    if text.isascii() and text.isdigit():
        parent = {3: text[:1], 4: "0" if text.startswith("10") else text[:2]}.get(len(text))
        if parent in STATES:
            status = STATES[parent]
            return "exception" if status == "returned" else status
    return "in_transit"


def sign(param: str, key: str, customer: str) -> str:
    """Upper-case hex MD5 of ``param + key + customer`` (exactly the ``param`` string sent)."""
    return hashlib.md5((param + key + customer).encode("utf-8")).hexdigest().upper()


def query_param(com: str, num: str, phone: str | None = None) -> str:
    """The ``param`` field: compact JSON, newest checkpoints first, sub-states on."""
    param: dict[str, str] = {"com": com, "num": num}
    if phone:
        param["phone"] = phone
    param.update({"resultv2": "1", "order": "desc"})
    return json.dumps(param, ensure_ascii=False, separators=(",", ":"))


def _china_time(value: object) -> datetime:
    return in_utc(datetime.fromisoformat(str(value).strip()), naive=CHINA_TIME)


def _failure_code(answer: dict[str, Any]) -> str | None:
    """kuaidi100's ``returnCode`` when the answer is a failure, else None."""
    if answer.get("result") is False or (answer.get("returnCode") and not answer.get("data")):
        return str(answer.get("returnCode") or "")
    return None


def _busy(response: httpx.Response) -> str | None:
    # HTTP 200 that says kuaidi100's servers are busy or failing, or that is not a JSON object at all
    # (a gateway's page, a body cut short): worth another attempt.
    if response.status_code != 200:
        return None
    answer = json_object(response.content)
    if answer is None:
        return "an answer credex cannot read (not a JSON object)"
    code = _failure_code(answer)
    return f"kuaidi100 returnCode {code}" if code in RETRYABLE_CODES else None


class Kuaidi100Carrier(CarrierClient):
    provider = "kuaidi100"
    issues_waybills = False

    def __init__(
        self, http: RetryingHttp, *, customer: str, key: SecretStr, default_carrier: str | None = None
    ) -> None:
        super().__init__(http, secrets=(key.get_secret_value(), customer))
        self._customer = customer
        self._key = key
        self.default_carrier = default_carrier

    def create_shipment(
        self,
        *,
        idempotency_key: str,
        order_ref: str,
        recipient: dict[str, str],
        items: list[dict[str, Any]],
    ) -> Waybill:
        raise CarrierNotConfigured(
            "the kuaidi100 provider only tracks parcels and cannot create shipments: the warehouse needs "
            "CREDEX_LOGISTICS_PROVIDER=generic and a carrier that speaks the generic contract"
        )

    def cancel_shipment(self, shipment_id: str, *, idempotency_key: str) -> CancelResult:
        raise CarrierNotConfigured(
            "the kuaidi100 provider only tracks parcels and cannot cancel shipments: cancel at the carrier "
            "that issued the waybill (CREDEX_LOGISTICS_PROVIDER=generic)"
        )

    def track(self, express_no: str, *, carrier: str | None = None, phone: str | None = None) -> Tracking:
        com = carrier or self.default_carrier
        if not com:
            raise CarrierNotConfigured(
                "kuaidi100 needs the carrier's code (e.g. shunfeng, yuantong, zhongtong): "
                "pass --carrier CODE or set CREDEX_LOGISTICS_CARRIER"
            )
        param = query_param(com, express_no, phone)
        form = {
            "customer": self._customer,
            "param": param,
            "sign": sign(param, self._key.get_secret_value(), self._customer),
        }
        what = f"the tracking of {express_no}"
        response = self._send("POST", QUERY_PATH, what=what, data=form, retryable_answer=_busy)
        if response.status_code != 200:
            status = response.status_code
            if status in (401, 403):
                raise CarrierKeyRefused(f"kuaidi100 refused {what} (HTTP {status})", http_status=status)
            if 400 <= status < 500:
                raise CarrierRefusal(f"kuaidi100 refused {what} (HTTP {status})", http_status=status)
            raise CarrierUnreachable(
                f"kuaidi100 at {self._http.where} failed {what} (HTTP {status})", http_status=status
            )
        answer = json_object(response.content)
        if answer is None:  # the retry hook lets none through
            raise CarrierUnreachable(
                f"kuaidi100 at {self._http.where} answered {what} with something that is not JSON",
                http_status=200,
                reason="unreadable answer",
            )
        code = _failure_code(answer)
        if code is not None:
            raise self._refusal(code, str(answer.get("message") or ""), com=com, express_no=express_no)
        try:
            return self._tracking(answer, com=com, express_no=express_no)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            detail = self._redact(str(error))[:120]
            raise InvalidCarrierAnswer(
                f"kuaidi100 answered {what} with something credex cannot read ({detail})",
                http_status=200,
                error_code="invalid_answer",
                reason=f"HTTP 200 invalid_answer: {detail}",
            ) from None

    def _tracking(self, answer: dict[str, Any], *, com: str, express_no: str) -> Tracking:
        """A success read, or ValueError. A success says so, as kuaidi100's do (``status`` "200",
        ``message`` "ok"): an answer that is neither that nor a failure it names is not one, whatever
        data it holds. And it is about the parcel asked (``nu`` and ``com``, ``echo_problem``)."""
        status, message = answer.get("status"), answer.get("message")
        said_ok = isinstance(message, str) and message.strip().lower() == "ok"
        if isinstance(status, bool) or str(status).strip() != "200" or not said_ok:
            raise ValueError(
                f"not a success: status {shown(status)} and message {shown(message)}, "
                "where one says '200' and 'ok'"
            )
        for name, asked in (("nu", express_no), ("com", com)):
            if problem := echo_problem(name, answer.get(name), asked):
                raise ValueError(problem)
        points = answer.get("data") or []
        if not isinstance(points, list):
            raise ValueError(f"data is not a list: {shown(points)}")
        checkpoints = []
        for point in points:
            if point.get("statusCode") not in (None, ""):
                status = kuaidi100_status(point["statusCode"])
            else:
                words = point.get("status")
                words = words.strip() if isinstance(words, str) else ""
                status = STATE_WORDS.get(words, "in_transit")
            location = point.get("location") or point.get("areaName") or None
            location = clean_text(self._hide(location)) if isinstance(location, str) else ""
            context = point.get("context")
            checkpoints.append(
                Checkpoint(
                    time=_china_time(point.get("ftime") or point["time"]),
                    status=status,
                    message=clean_text(self._hide(context)) if isinstance(context, str) else "",
                    location=location or None,
                )
            )
        checkpoints.sort(key=lambda point: point.time, reverse=True)
        return Tracking(
            carrier=com,
            express_no=express_no,
            status=kuaidi100_status(answer.get("state")),
            checkpoints=tuple(checkpoints),
            updated_at=checkpoints[0].time if checkpoints else None,
        )

    def _refusal(self, code: str, message: str, *, com: str, express_no: str) -> CarrierError:
        # Both are kuaidi100's own text: one safe line each, the key and the customer hidden (its
        # words may quote them: "key … expired").
        code = self._said(code, 32)
        said = f": {self._said(message, 160)}" if message else ""
        parcel = f"{com} {express_no}"
        facts: dict[str, Any] = {
            "http_status": 200,
            "error_code": code or None,
            "reason": f"kuaidi100 returnCode {code or '?'}",
        }
        if code == "500":
            return ParcelNotFound(f"kuaidi100 has no result for {parcel} (yet){said}", **facts)
        if code == "408":
            return CarrierRefusal(
                f"kuaidi100 needs the recipient's or sender's phone number to track {parcel} "
                f"(returnCode 408): pass --phone{said}",
                **facts,
            )
        if code == "503":
            return CarrierKeyRefused(
                "kuaidi100 refused the signature (returnCode 503): "
                "check CREDEX_KUAIDI100_KEY and CREDEX_KUAIDI100_CUSTOMER",
                **facts,
            )
        if code == "601":
            return CarrierKeyRefused(
                "kuaidi100 refused the query: the key has expired or has no queries left "
                f"(returnCode 601){said}",
                **facts,
            )
        if code == "400":
            return CarrierRefusal(
                f"kuaidi100 refused the query for {parcel} as bad data (returnCode 400): "
                f"check the carrier code and the express number{said}",
                **facts,
            )
        return CarrierRefusal(
            f"kuaidi100 refused the query for {parcel} (returnCode {code or '?'}){said}", **facts
        )
