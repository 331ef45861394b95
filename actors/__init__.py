"""Plain classes with pure cores: the context, the rate limiter, the model router with its
breakers, the reply cache, the workflows, and the turn that uses them (chat, calls). Ray makes
them remote in infra's composition root (infra/ray/), so none of them is a Ray actor here:
the name is DESIGN.md's, for the state that Ray actors own."""
