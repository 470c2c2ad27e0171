//! A discrete-event simulation of a pool, to drive the policy in tests and plots. (Follows.)
