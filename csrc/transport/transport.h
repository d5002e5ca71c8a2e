// The transport interface: everything an algorithm needs from the wires between ranks.
//
// An algorithm turns a collective into a Plan (algorithms/); a transport executes plans.
// Because plans name only peers, buffers and dependencies, every algorithm runs on every
// transport.  Transports also own failure detection: a transport is told its deadline and
// raises TimeoutError naming the rank it waited for, or CommError when a peer died or gave
// up, and it lets peers know when this rank gives up (abort).
#pragma once

#include <atomic>
#include <string>

#include "algorithms/plan.h"
#include "common.h"

namespace pycomm {

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int lanes() const = 0;  // how many independent channels per peer a plan may use
  virtual const char* name() const = 0;

  // Runs `plan` until its required tasks are done (returns true), or until `returnBy`
  // passes or a task marked `wake` is done first (returns false; call again to go on:
  // progress is kept in the tasks).  `desc` identifies the collective (checked against
  // what the peers send); `reduceType`/`op` say how RecvReduce tasks combine bytes.  Past
  // `deadline` it raises.  `since`: when the caller started waiting (a resumed call), for
  // the elapsed time its errors report and the first liveness check; default: now.
  // `interrupt`: while waiting, return (false) as soon as it reads true (new work to add).
  virtual bool execute(Plan& plan, const OpDesc& desc, DType reduceType, RedOp op,
                       Clock::time_point deadline,
                       Clock::time_point returnBy = Clock::time_point::max(),
                       Clock::time_point since = Clock::time_point(),
                       const std::atomic<bool>* interrupt = nullptr) = 0;

  // The descriptor of the piece waiting at the head of (peer, lane), if one is there;
  // nothing is consumed.  Point-to-point matching reads a message's tag and size here.
  virtual bool peek(int peer, int lane, OpDesc* desc) = 0;

  // Throws if a peer died or gave up (`desc` names what this rank is doing, `waitingOn`
  // the peer it waits for, or -1).
  virtual void checkPeers(const OpDesc& desc, int waitingOn) = 0;
  // "rank 1 is at all_reduce #3 (...)": what a peer last published, for error messages.
  virtual std::string peerState(int peer) const = 0;
  // Fails this transport for good with `msg` (kind 0 CommError, 1 TimeoutError, 2
  // MismatchError): peers are told (abort) and every later call raises.
  [[noreturn]] virtual void fail(const std::string& msg, int kind) = 0;

  // Called once the Python layer knows the call is valid, before execute: peers waiting on
  // this rank can then see which collective it is in.
  virtual void publish(const OpDesc& desc) = 0;

  // Gives up: peers blocked on this rank fail promptly with `why` instead of timing out.
  virtual void abort(const std::string& why) = 0;
};

}  // namespace pycomm
