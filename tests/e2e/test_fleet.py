"""A real fleet (issue 27, item 3): three cxr-node processes on one PostgreSQL with one shared
data_dir, Orthanc as the PACS. Studies are sent to all three; the node holding a study in
processing is SIGKILLed; another node takes the study over within the lease expiry plus one
heartbeat, audited with the dead node's id, and every study's SR and Secondary Captures reach
Orthanc exactly once. A fourth node with a data_dir of its own is refused at start.

Short leases (heartbeat 0.5 s, lease 4 s) and a tiny random model keep it well under two minutes.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest
from conftest import PY, REPO, cli, free_port, storescu
from conftest import wait_until as _wait
from dicomgen import make_cr, uid
from helpers_model import make_checkpoint

HEARTBEAT, LEASE = 0.5, 4.0
STUDIES_PER_NODE, FILMS = 2, 3
SECRET = "Fleet^Zebulon"


@pytest.fixture
def sql(postgres):
    from sqlalchemy import create_engine, text

    url = postgres.new_database("fleet")
    engine = create_engine(url)

    def query(q: str, **params) -> list:
        with engine.connect() as c:
            return list(c.execute(text(q), params))

    query.url = url
    yield query
    engine.dispose()


def _fleet(node_factory, orthanc, sql, tmp_path, n: int = 3):
    ckpt = make_checkpoint(tmp_path / "m.pt", input_size=64)
    shared = tmp_path / "shared-data"  # one spool for all: what NFS or a shared volume gives real nodes
    nodes = []
    for i in range(n):
        metrics = free_port()
        node = node_factory(f"n{i}", quiet_seconds=10, db_url=sql.url, extra=(
            f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\nbatch_size = 1\n'
            f"[fleet]\nheartbeat_seconds = {HEARTBEAT}\nlease_seconds = {LEASE}\n"
            f"[metrics]\nport = {metrics}\n"
            "[outbox]\npoll_seconds = 0.5\nretry_base_seconds = 1\nretry_max_seconds = 2\nmax_attempts = 50\n"
            f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
        node.metrics_port = metrics
        node.data_dir = shared
        node.config.write_text(node.config.read_text().replace(str(node.root / "data"), str(shared)))
        nodes.append(node)
    nodes[0].upgrade()
    errors: list[BaseException] = []

    def start(node) -> None:
        try:
            node.start(upgrade=False)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return nodes


def _node_id(sql, node) -> str:
    (row,) = sql("select node_id from nodes where port = :p", p=node.port)
    return row[0]


def test_three_nodes_one_killed_mid_study_every_result_reaches_the_pacs_once(
        node_factory, orthanc_factory, sql, tmp_path):
    orthanc = orthanc_factory().start()
    nodes = _fleet(node_factory, orthanc, sql, tmp_path)
    ids = {_node_id(sql, n): n for n in nodes}
    assert len(ids) == 3 and {r[0] for r in sql("select node_id from nodes where stopped_at is null")} == set(ids)

    # a node that cannot see the others' markers (a data_dir of its own) is refused, saying why
    loner = node_factory("loner", db_url=sql.url, extra=f"[fleet]\nheartbeat_seconds = {HEARTBEAT}\n"
                                                        f"lease_seconds = {LEASE}\n")
    refused = subprocess.Popen([PY, "-m", "cxr_node", "--config", str(loner.config), "serve"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # checked below

    studies: dict[str, int] = {}
    batches = []
    for k, node in enumerate(nodes):  # studies sent to all three
        for j in range(STUDIES_PER_NODE):
            study = uid()
            files = [make_cr(tmp_path / "films" / f"{k}-{j}-{f}.dcm", study_uid=study, rows=160, cols=160,
                             seed=100 * k + 10 * j + f, patient_name=SECRET) for f in range(FILMS)]
            studies[study] = FILMS
            batches.append((node, files))
    sent: list = []
    senders = [threading.Thread(target=lambda n=n, f=f: sent.append(storescu(n.port, *f))) for n, f in batches]
    for t in senders:
        t.start()

    # the node holding a study in processing dies
    def holder():
        rows = sql("select claimed_by, study_uid from studies where state = 'processing'")
        return rows[0] if rows else None

    victim_id, victim_study = _wait(holder, 120, "a study in processing", nodes[0], poll=0.05)
    victim = ids[victim_id]
    victim.kill()
    killed_at = time.time()
    for t in senders:
        t.join()
    assert len(sent) == len(batches)
    survivors = [n for n in nodes if n is not victim]
    # every film reached the shared spool and the database (the victim's own senders may have been cut
    # off mid-association: send those again to a survivor, as a modality retries)
    stored = {r[0] for r in sql("select sop_instance_uid from instances")}
    from pydicom import dcmread

    for _, files in batches:
        missing = [f for f in files if dcmread(f, stop_before_pixels=True).SOPInstanceUID not in stored]
        if missing:
            assert storescu(survivors[0].port, *missing).returncode == 0

    # the takeover: audited with the dead node's id, within the lease expiry + one heartbeat
    (req,) = _wait(lambda: sql("select ts, detail, reason from audit_events where event = 'study.requeued' "
                               "and study_uid = :s", s=victim_study), 30, "study.requeued", survivors[0])
    detail = req[1] if isinstance(req[1], dict) else json.loads(req[1])
    assert detail["node"] == victim_id and detail["by"] in ids and detail["by"] != victim_id
    assert "lease expired" in req[2]
    took = req[0].timestamp() - killed_at
    # the victim's last renewal came at most one heartbeat before the kill, and the taker looks every
    # heartbeat; 1.5 s more for a shared 2-core machine's scheduling
    assert took <= LEASE + HEARTBEAT + 1.5, f"takeover took {took:.1f} s"
    print(f"takeover of {victim_study} from {victim_id}: {took:.2f} s after the SIGKILL (lease {LEASE:g} s, "
          f"heartbeat {HEARTBEAT:g} s)")

    # every study's results reach Orthanc exactly once: one SR and one SC per film, nothing twice
    def all_there():
        return all(len(orthanc.find(StudyInstanceUID=s)) == FILMS + 1 for s in studies)

    _wait(all_there, 150, "every study's SR and SCs in Orthanc", survivors[0], poll=1)
    time.sleep(2 * 0.5 + 1)  # a second send, if there were one, would be due by now
    for study in studies:
        assert len(orthanc.find(StudyInstanceUID=study)) == FILMS + 1
        assert len(orthanc.find(StudyInstanceUID=study, Modality="SR")) == 1  # one SR version, not two
    sends = sql("select sop_instance_uid, count(*) from audit_events where event = 'outbox.sent' "
                "group by sop_instance_uid")
    assert len(sends) == len(studies) * (FILMS + 1) and {n for _, n in sends} == {1}
    triaged = sql("select sop_instance_uid, count(*) from audit_events where event = 'image.triaged' "
                  "group by sop_instance_uid")
    assert len(triaged) == len(studies) * FILMS and {n for _, n in triaged} == {1}
    # the interrupted attempt counted: the study was claimed twice, the second time by the taker
    claims = sql("select detail from audit_events where event = 'study.processing' and study_uid = :s "
                 "order by id", s=victim_study)
    attempts = [(c[0] if isinstance(c[0], dict) else json.loads(c[0])) for c in claims]
    assert [a["attempt"] for a in attempts] == [1, 2] and attempts[1]["node"] != victim_id
    assert sql("select state from studies where study_uid = :s", s=victim_study)[0][0] == "processed"

    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1, err
    assert "is not shared with the other nodes on this database" in err and "NFS" in err
    assert "docs/fleet.md" in err and any(i in err for i in ids)
    assert sql("select count(*) from audit_events where event = 'node.refused'")[0][0] == 1

    # status and the metrics name the dead node, its expired lease, and that it holds nothing now
    from cxr_node.db.session import Database
    from cxr_node.study import leases

    db = Database(sql.url)
    with db.session() as s:  # what `status --format json` shows as "nodes"
        by = {n["node"]: n for n in leases.fleet(s)}
    db.dispose()
    assert by[victim_id]["state"] == "expired" and by[victim_id]["studies"] == 0 and by[victim_id]["outbox"] == 0
    assert all(by[i]["state"] == "live" for i in ids if i != victim_id)
    table = cli("status", config=survivors[0].config).stdout
    assert f"node        {victim_id}" in table and "LEASE EXPIRED" in table
    with urllib.request.urlopen(f"http://127.0.0.1:{survivors[0].metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert f'cxr_node_node_live{{node="{victim_id}"}} 0.0' in metrics
    assert f'cxr_node_node_held{{kind="studies",node="{victim_id}"}} 0.0' in metrics
    taker = ids[detail["by"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{taker.metrics_port}/metrics", timeout=10) as r:
        assert 'cxr_node_takeovers_total{kind="study"} 1.0' in r.read().decode()

    # a clean stop leaves the fleet saying so, and its marker goes
    assert survivors[1].stop() == 0
    (state,) = sql("select stopped_at is not null from nodes where port = :p", p=survivors[1].port)
    assert state[0]
    assert "Zebulon" not in "".join(n.log for n in nodes)  # no patient name in any node's log
