"""`ivr dial NUMBER [--var K=V ...]` and `ivr dial --csv FILE`: queue outbound calls."""

from __future__ import annotations

from .output import FAILED, OK
from .output import fail as _fail


def dial(args) -> int:
    """`ivr dial`: queue outbound calls, as POST /api/calls does."""
    from redis.exceptions import RedisError

    from ..config import ConfigError
    from ..services import build_redis, outbound_missing, undeployed_agent
    from ..startup import load_deployment
    from ..store.calls import CallStore
    from ..store.outbound import OutboundError, OutboundQueue, parse_request

    try:
        bodies = _dial_bodies(args)
        requests_ = [parse_request(body) for body in bodies]
    except (OutboundError, ValueError) as exc:
        where = getattr(exc, "row", "")
        return _fail(f"{where}{exc}")
    try:
        # The agents too: a call for one that is not deployed is refused now,
        # not given the default agent when it is answered.
        settings, _, agents = load_deployment()
    except ConfigError as exc:
        return _fail(" ".join(exc.problems))
    missing = outbound_missing(settings)
    if missing:
        return _fail(missing[0])
    refused = undeployed_agent(agents, args.agent)
    if refused:
        return _fail(refused)
    if not settings.redis_url:
        return _fail("REDIS_URL is not set: calls are queued in the app's Redis.")
    client = build_redis(settings.redis_url, settings.redis_cluster)
    store = CallStore(client, history_max=1, ttl=60, retention=settings.transcript_retention)
    queue = OutboundQueue.from_settings(store, settings)
    try:
        for request in requests_:
            print(f"{queue.enqueue(request)} queued {request.to}")
    except RedisError as exc:
        return _fail(f"cannot queue in Redis at REDIS_URL ({exc}).", FAILED)
    finally:
        client.close()
    return OK


def _dial_bodies(args) -> list[dict]:
    """The calls asked for, as API bodies: one from NUMBER and --var, or one per CSV row."""
    import csv

    from ..store.outbound import OutboundError, parse_request

    if bool(args.number) == bool(args.csv):
        raise ValueError("Give a NUMBER or --csv FILE, not both or neither.")
    if args.number:
        variables = {}
        for pair in args.var:
            name, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--var takes NAME=VALUE, not {pair!r}.")
            variables[name] = value
        return [{"to": args.number, "variables": variables, "agent": args.agent}]
    try:
        with args.csv.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ValueError(f"cannot read {args.csv}: {exc.strerror}.") from exc
    if not rows or "to" not in rows[0]:
        raise ValueError(f"{args.csv} needs a header row with a `to` column.")
    bodies = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        body = {
            "to": (row.pop("to") or "").strip(),
            "variables": {k: v for k, v in row.items() if k is not None},
            "agent": args.agent,
        }
        try:
            parse_request(body)
        except OutboundError as exc:
            exc.row = f"{args.csv} line {number}: "
            raise
        bodies.append(body)
    return bodies
