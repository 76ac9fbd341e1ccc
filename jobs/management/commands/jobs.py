"""`manage.py jobs submit|kinds|list|show|watch|cancel|retry|stats|schedules|pause|resume`: the operators' CLI."""

from __future__ import annotations

import json
from datetime import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import services
from jobs.errors import ConveyorError, JobNotFound
from jobs.management.watch import watch


class Command(BaseCommand):
    help = "Submit, inspect, cancel and retry jobs."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
        submit = sub.add_parser("submit", help="submit a job and print its id", called_from_command_line=True)
        submit.add_argument("kind", help="a kind `manage.py jobs kinds` lists")
        submit.add_argument("--payload", default="{}", help="JSON object (default {})")
        submit.add_argument("--queue")
        submit.add_argument("--priority", type=int, default=0)
        submit.add_argument("--run-after", help="ISO 8601 date-time with time zone")
        submit.add_argument("--max-attempts", type=int)
        submit.add_argument("--idempotency-key")
        sub.add_parser("kinds", help="the kinds you can submit, with their queues", called_from_command_line=True)
        listing = sub.add_parser("list", help="newest jobs first", called_from_command_line=True)
        listing.add_argument("--state")
        listing.add_argument("--queue")
        listing.add_argument("--kind")
        listing.add_argument("--limit", type=int, default=20)
        for name, text in (
            ("show", "print a job as JSON"),
            ("cancel", "cancel a job"),
            ("retry", "retry a dead or cancelled job"),
        ):
            action = sub.add_parser(name, help=text, called_from_command_line=True)
            action.add_argument("id")
        follow = sub.add_parser(
            "watch",
            help="follow a job (its progress, streamed text and log) or a batch until it ends;"
            " exits 0 when it succeeded, 1 when not",
            called_from_command_line=True,
        )
        follow.add_argument("id", help="a job's id or a batch's")
        sub.add_parser("stats", help="queue statistics", called_from_command_line=True)
        schedules = sub.add_parser("schedules", help="list the schedules", called_from_command_line=True)
        schedules.add_argument("--run", metavar="NAME", help="submit that schedule's job now and print its id")
        for name, text in (("pause", "pause a queue: nothing of it is claimed"), ("resume", "resume a paused queue")):
            control = sub.add_parser(name, help=text, called_from_command_line=True)
            control.add_argument("queue")

    def handle(self, *args, action: str, **options) -> None:
        try:
            getattr(self, f"_{action}")(**options)
        except ConveyorError as exc:
            raise CommandError(exc.message) from None
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def _submit(self, *, kind, payload, queue, priority, run_after, max_attempts, idempotency_key, **_):
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--payload is not valid JSON: {exc}") from None
        when = None
        if run_after:
            try:
                when = datetime.fromisoformat(run_after)
            except ValueError:
                raise CommandError(f"--run-after {run_after!r} is not an ISO 8601 date-time") from None
        submitted = services.submit_job(
            kind,
            data,
            queue=queue,
            priority=priority,
            run_after=when,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            owner="cli",
        )
        if not submitted.created:
            self.stderr.write(f"idempotency key already used: existing job {submitted.job.id}")
        self.stdout.write(str(submitted.job.id))

    def _kinds(self, **_):
        # Read from the registry now: your own apps' kinds (CONVEYOR_APPS) are among them.
        for h in services.client_handlers():
            self.stdout.write(f"{h.kind:<24} {h.queue:<10} {h.description}".rstrip())

    def _list(self, *, state, queue, kind, limit, **_):
        if not 1 <= limit <= 1000:
            raise CommandError("--limit must be from 1 to 1000")
        for job in services.list_jobs(state=state, queue=queue, kind=kind, limit=limit):
            self.stdout.write(
                f"{job.id}  {job.state:<9}  {job.kind:<16} {job.queue:<10} attempts {job.attempts}/{job.max_attempts}  "
                f"{job.created_at:%Y-%m-%d %H:%M:%S}"
            )

    def _show(self, *, id, **_):
        job = services.get_job(id)
        data = {
            "id": str(job.id),
            "kind": job.kind,
            "queue": job.queue,
            "state": job.state,
            "payload": job.payload,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "progress": {"percent": job.progress_percent, "message": job.progress_message},
            "result": job.result,
            "error": {"type": job.error_type, "message": job.error_message} if job.error_type else None,
            "run_after": job.run_after,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "attempt_history": [
                {
                    "number": a.number,
                    "outcome": a.outcome or "running",
                    "worker": a.worker,
                    "error": a.error_message or None,
                }
                for a in job.attempt_set.all()
            ],
        }
        self.stdout.write(json.dumps(data, indent=2, default=str))

    def _watch(self, *, id, **_):
        try:
            target = services.get_job(id)
        except JobNotFound:
            try:
                target = services.get_batch(id)
            except services.BatchNotFound:
                raise CommandError(f"no job or batch with id {id}", returncode=2) from None
        try:
            code = watch(target, self.stdout._out)
        except KeyboardInterrupt:
            code = 130
        if code:
            raise SystemExit(code)

    def _cancel(self, *, id, **_):
        job = services.cancel_job(id, actor="cli")
        self.stdout.write(f"{job.id} {job.state}{' (cancel requested)' if job.cancel_requested_at else ''}")

    def _retry(self, *, id, **_):
        job = services.retry_job(id, actor="cli")
        self.stdout.write(f"{job.id} {job.state}")

    def _pause(self, *, queue, **_):
        control = services.pause_queue(queue)
        self.stdout.write(f"{control.name} paused")

    def _resume(self, *, queue, **_):
        control = services.resume_queue(queue)
        self.stdout.write(f"{control.name} resumed")

    def _stats(self, **_):
        header = f"{'queue':<12}{'queued':>8}{'sched':>7}{'running':>8}{'retry':>7}{'dead':>6}{'oldest s':>10}{'ok/min':>8}{'fail/min':>9}"
        self.stdout.write(header)
        for q in services.queue_stats(always=["default"]):
            oldest = "-" if q["oldest_queued_age_seconds"] is None else f"{q['oldest_queued_age_seconds']:.1f}"
            self.stdout.write(
                f"{q['queue']:<12}{q['queued']:>8}{q['scheduled']:>7}{q['running']:>8}{q['retrying']:>7}{q['dead']:>6}"
                f"{oldest:>10}{q['succeeded_last_minute']:>8}{q['failed_last_minute']:>9}"
            )

    def _schedules(self, *, run, **_):
        if run:
            self.stdout.write(str(services.run_now(run).id))
            return
        self.stdout.write(
            f"{'name':<24}{'kind':<18}{'when':<22}{'zone':<16}{'enabled':<9}{'next run (UTC)':<21}last job"
        )
        for s in services.list_schedules():
            when = s.cron or f"every {s.interval_seconds}s"
            next_run = f"{s.next_run_at:%Y-%m-%d %H:%M:%S}" if s.next_run_at else "-"
            last = f"{s.last_job_id} {s.last_job.state}" if s.last_job else "-"
            skipped = f"  ({s.skipped} skipped)" if s.skipped else ""
            self.stdout.write(
                f"{s.name:<24}{s.kind:<18}{when:<22}{s.timezone:<16}{'yes' if s.enabled else 'no':<9}{next_run:<21}"
                f"{last}{skipped}"
            )
