"""The stages of an audit, each a function from what earlier stages produced to a typed result
(:mod:`advface.audit.results`); :func:`advface.audit.run.run_audit` runs them in order:

1. :mod:`~advface.audit.stages.inputs`: dataset, database under audit, identity split, victims, thresholds;
2. :mod:`~advface.audit.stages.protection`: the protection and the keyed transform, the templates of each kind;
3. :mod:`~advface.audit.stages.thief_scan`: the database thief without keys (a store only);
4. :mod:`~advface.audit.stages.attackers`: each attacker on raw, protected and protected+key templates;
5. :mod:`~advface.audit.stages.verification`: performance preservation;
6. :mod:`~advface.audit.stages.unlinkability`: unlinkability and renewability (D_sys);
7. :mod:`~advface.audit.stages.scenarios` (full disclosure, known pairs, score exposure) and, with ``--matching
   encrypted``, :mod:`~advface.audit.stages.encrypted_matching` (the database and the sidecar's memory);
8. :mod:`~advface.audit.stages.layers`: each attacker of the threat model against the layer that should stop it.

What a stage hands to the later ones in memory (:class:`~advface.audit.stages.inputs.AuditInputs`,
:class:`~advface.audit.stages.protection.ProtectionSetup`) is not written to the report; plot data goes to the
report's :class:`~advface.audit.report.ReportArtifacts` as it is measured.
"""
