"""What a merge writes: a model dir (:mod:`.model`), one LoRA adapter dir (:mod:`.adapter`),
the ledger beside either (:mod:`.ledger`) and the output fidelity checks (:mod:`.fidelity`)."""
