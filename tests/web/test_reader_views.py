"""What the console and the CLI say to a reader, as pure functions: names, films in words, the flag
in words, the audit story as sentences (the pages and commands that use them are tested through
the real daemon and browser in test_web_browser, test_cli and test_audit_chain)."""

from __future__ import annotations

from cxr_node.audit.story import sentence
from cxr_node.web.headers import patient_name, study_date
from cxr_node.web.queries import films_in_words, flag_in_words


def test_names_and_dates_as_a_reader_writes_them():
    assert patient_name("Doe^Jane") == "Doe, Jane"
    assert patient_name("Doe^Jane^Mary^Dr") == "Doe, Jane Mary"
    assert patient_name("Doe") == "Doe" and patient_name("") == ""
    assert patient_name("Yamada^Tarou=山田^太郎") == "Yamada, Tarou"  # the alphabetic group only
    assert study_date("20261123") == "2026-11-23" and study_date("2026") == "2026"


def test_films_in_words():
    assert films_in_words(2, 1, 1) == "2 films: 1 analysed, 1 not analysed"
    assert films_in_words(1, 1, 0) == "1 film, analysed"
    assert films_in_words(1, 0, 1) == "1 film, not analysed"
    assert films_in_words(3, 0, 0) == "3 films, not analysed yet"
    assert films_in_words(3, 1, 0) == "3 films: 1 analysed, 2 not for triage"


def test_the_flag_in_words_names_the_operating_point_and_whose_it_is():
    group = {"probabilities": {"COVID-19": 0.953, "Normal": 0.047, "Viral pneumonia": 0.0},
             "thresholds": {"COVID-19": 0.261, "Normal": 0.487, "Viral pneumonia": 0.13},
             "above": {"COVID-19": True, "Normal": False, "Viral pneumonia": False}}
    assert flag_in_words(group, "urgent", "model") == [
        "COVID-19 pattern 95%, above the model's operating point of 26% (not yet calibrated at this site)"]
    assert flag_in_words(group, "urgent", "site CR1 v2") == [
        "COVID-19 pattern 95%, above this site's operating point of 26%"]
    routine = {**group, "probabilities": {"COVID-19": 0.01, "Normal": 0.99, "Viral pneumonia": 0.0},
               "above": {"COVID-19": False, "Normal": True, "Viral pneumonia": False}}
    assert flag_in_words(routine, "routine", "model") == [
        "no finding above the model's operating point (not yet calibrated at this site; top class Normal 99%)"]
    assert flag_in_words(None, "urgent", "model") == []  # no SR to read: the page falls back to the audit reason
    # a v5 SR: the abnormality estimate speaks first, against its operating point
    v5 = {"probabilities": {"COVID-19": 0.3, "Normal": 0.6, "Viral pneumonia": 0.1}, "thresholds": {}, "above": {},
          "abnormal": 0.8712, "abnormal_threshold": 0.4}
    assert flag_in_words(v5, "urgent", "model") == [
        "abnormal 87%, above the model's operating point of 40% (not yet calibrated at this site)"]
    assert flag_in_words({**v5, "abnormal": 0.12}, "routine", "site CR1 v2") == [
        "abnormal 12%, below this site's operating point of 40%"]


def test_the_story_is_sentences_without_json_or_a_repeated_priority():
    triaged = {"event": "image.triaged", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.12345678901234567890",
               "reason": "COVID 0.953 >= threshold 0.261",
               "detail": {"top_label": "COVID", "probabilities": {"COVID": 0.953, "Normal": 0.047},
                          "priority": "urgent", "urgent": True, "model_version": "v2"}}
    text = sentence(triaged)
    assert "COVID 95%" in text and "priority urgent" in text and "URGENT" not in text
    assert "COVID 0.953 at or above threshold 0.261" in text
    assert sentence(triaged, short=True).count("\u2026") == 1  # the long UID shortened on the page
    processed = {"event": "study.processed", "reason": None, "sop_instance_uid": None,
                 "detail": {"version": 1, "analysed": 1, "refused": 1, "priority": "urgent", "objects": 2, "queued": 2}}
    assert sentence(processed) == ("version 1 processed: 1 film(s) analysed, 1 not analysed; priority urgent; "
                                   "2 result object(s), 2 queued to send")
    odd = {"event": "station.baseline", "reason": None, "sop_instance_uid": None, "detail": {"films": 20}}
    assert "{" not in sentence(odd) and sentence(odd)  # an event without a sentence: what it means, never JSON
