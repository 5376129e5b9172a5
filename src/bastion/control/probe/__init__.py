"""`bastion probe`: the adversarial self-test of a running deployment. `cases` derives the
attacks from the configuration and the gateway's own listings, family by family (`tenancy`,
`protocol`, `tokens`; pure, over the values in `types`), and `verdicts` judges the answers;
`run` drives them over HTTP (`client`) as disposable probe agents or the agents given
(`identities`), one `attacks` function per kind of case; `report` prints the verdicts.
"""

__all__ = [
    "attacks",
    "cases",
    "client",
    "identities",
    "protocol",
    "report",
    "run",
    "tenancy",
    "tokens",
    "types",
    "verdicts",
]
