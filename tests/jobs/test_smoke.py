from jobs.models import Job, JobEvent


def test_submitting_writes_the_job_its_event_and_its_broker_row(make_job):
    from django_q.models import OrmQ

    job = make_job("demo.sleep", {"seconds": 1})
    assert Job.objects.get(id=job.id).state == "queued"
    assert list(JobEvent.objects.filter(job=job).values_list("type", flat=True)) == ["job.created"]
    assert OrmQ.objects.filter(key="default").count() == 1
