//! logging-channel: the primary↔backup transport of ftvmm — framing, acks,
//! heartbeats, flow control and the output rule's bookkeeping.
