"""The self-instruct pipeline with execution feedback (Code Llama paper §2.5): questions, unit tests, ten
solutions, sandboxed verification, and the kept triplets as SFT dialogs. ``stages.py`` runs the stages,
``command.py`` is ``codellama self-instruct``."""
