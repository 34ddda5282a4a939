"""`trainforge auto`: plan, search, final training, deployment and report within one time budget.

    command.py   the verb: options, --resume, the printed summary and serve command
    pipeline.py  the stages on one clock, and auto.json
    inputs.py    the data checked and split once (split.json)
    deploy.py    latency of candidates, the int8 rule, the deployed model's speed
"""
