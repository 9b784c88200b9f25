"""A person as the labeller of `proximal prefs --reward.labeller human` (Christiano et al. 2017, Section 2.2
and Appendix B: people compared two short clips side by side while the agent trained).

Data flow: the training loop's `PreferenceLearner` submits queries to a `HumanLabeller`
(labeller.py: the bounded queue, queries.jsonl, answers fsynced to comparisons.jsonl); the
`FeedbackServer` (server.py) serves the page (page.html) the person answers on, the clips drawn
by a `ClipRenderer` (clips.py); the learner takes the answers in and refits the reward model.
"""
