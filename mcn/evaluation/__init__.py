"""Evaluation after training: the baselines a fusion must beat (`baselines`), the sweep summary (`summary`), the
study over seeds (`study`) and its report (`report`), tables and figures, the saved components read back
(`components`) and the robustness suite (`robustness`)."""
