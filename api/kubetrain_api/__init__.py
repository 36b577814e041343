"""kubetrain's shared vocabulary: what the trainer, `kubetrain run`, the pod entrypoint and the operator
agree on. pydantic and the standard library only; it imports neither side (tests/test_architecture.py).

- config.py      the trainer's sections of a manifest (TrainerConfig)
- manifest.py    the LLMTrainingJob manifest: JobSpec (TrainerConfig + cluster sections), load_manifest
- status.py      the job's status, phases and conditions (the CRD's status schema)
- exit_codes.py  what a trainer's exit code means
- contract.py    events.jsonl, /progress, the trainer's command line and the pod entrypoint's rules
"""
