"""gym.wrappers stand-ins used by reference implementations: Wrapper, TransformObservation, TransformReward (old API)."""

from __future__ import annotations


class Wrapper:
    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, **kw):
        return self.env.reset(**kw)

    def step(self, action):
        return self.env.step(action)


class TransformObservation(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def reset(self, **kw):
        return self.f(self.env.reset(**kw))

    def step(self, action):
        obs, r, done, info = self.env.step(action)
        return self.f(obs), r, done, info


class TransformReward(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def step(self, action):
        obs, r, done, info = self.env.step(action)
        return obs, self.f(r), done, info
