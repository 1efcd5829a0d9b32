package netstack

import (
	"context"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// linkEndpoint is the gVisor link endpoint of the Stack's only NIC: it moves packets in batches, never
// one at a time through a channel (Tailscale's wgengine/netstack link endpoint is the model).
//
// Inbound, deliver hands a batch of several packets to gVisor's GRO, which coalesces consecutive
// segments of a TCP flow into one packet before the stack sees them, and flushes it at the end of the
// batch; a batch of one (what the Splitter gives, the kernel's super-packets whole) goes to the stack
// directly.
//
// Outbound, the stack's WritePackets appends to a slice under a mutex, and the reader takes everything
// queued (up to its batch) in one go.
type linkEndpoint struct {
	mtu uint32
	// gso is set once the packets the stack emits go to the kernel with virtio headers (PumpOffload):
	// TCP then hands the link segmentation-offload packets with partial checksums (HostGSOSupported).
	gso atomic.Bool

	// groMu serializes deliveries: gro.GRO is not safe for concurrent use.
	groMu sync.Mutex
	gro   gro.GRO

	// ready holds a token when packets may have been queued since the reader last looked.
	ready chan struct{}

	// mu guards all following fields.
	mu         sync.Mutex
	dispatcher stack.NetworkDispatcher
	out        []*stack.PacketBuffer // queued outbound packets, each holding a reference
	closed     bool
}

var (
	_ stack.LinkEndpoint = (*linkEndpoint)(nil)
	_ stack.GSOEndpoint  = (*linkEndpoint)(nil)
)

// gsoMaxSize is the largest segmentation-offload packet TCP may emit: what one IP packet's length
// field can say. (gVisor's TCP keeps its payload below this minus the largest headers.)
const gsoMaxSize = 65535

// GSOMaxSize implements stack.GSOEndpoint.
func (e *linkEndpoint) GSOMaxSize() uint32 { return gsoMaxSize }

// SupportedGSO implements stack.GSOEndpoint: host GSO once the kernel takes the packets whole
// (gso set), none before. TCP asks when a connection is set up.
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.gso.Load() {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

func newLinkEndpoint(mtu int) *linkEndpoint {
	e := &linkEndpoint{mtu: uint32(mtu), ready: make(chan struct{}, 1)}
	e.gro.Init(true)
	return e
}

// deliver hands inbound packets to the stack, coalescing TCP segments; it takes over their references.
func (e *linkEndpoint) deliver(pkts []*stack.PacketBuffer) {
	e.mu.Lock()
	d := e.dispatcher
	e.mu.Unlock()
	if d == nil {
		for _, pb := range pkts {
			pb.DecRef()
		}
		return
	}
	if len(pkts) == 1 {
		// Nothing to coalesce with (the Splitter hands the kernel's super-packets over one by
		// one, already coalesced): straight to the stack.
		d.DeliverNetworkPacket(pkts[0].NetworkProtocolNumber, pkts[0])
		pkts[0].DecRef()
		return
	}
	e.groMu.Lock()
	e.gro.Dispatcher = d
	for _, pb := range pkts {
		e.gro.Enqueue(pb)
		pb.DecRef()
	}
	e.gro.Flush()
	e.groMu.Unlock()
}

// read blocks until packets are queued (or ctx is done: it then returns 0), then moves up to len(dst)
// of them to dst; the caller owns their references.
func (e *linkEndpoint) read(ctx context.Context, dst []*stack.PacketBuffer) int {
	for {
		e.mu.Lock()
		if n := copy(dst, e.out); n > 0 {
			rest := copy(e.out, e.out[n:])
			clear(e.out[rest:])
			e.out = e.out[:rest]
			e.mu.Unlock()
			return n
		}
		closed := e.closed
		e.mu.Unlock()
		if closed {
			return 0
		}
		select {
		case <-e.ready:
		case <-ctx.Done():
			return 0
		}
	}
}

// WritePackets queues the stack's outbound packets for Read. When outQueueLen packets are queued it
// takes no more (the stack sees ErrNoBufferSpace; TCP retransmits).
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return 0, &tcpip.ErrClosedForSend{}
	}
	n := 0
	for _, pb := range pkts.AsSlice() {
		if len(e.out) >= outQueueLen {
			break
		}
		e.out = append(e.out, pb.IncRef())
		n++
	}
	e.mu.Unlock()
	if n == 0 {
		return 0, &tcpip.ErrNoBufferSpace{}
	}
	select {
	case e.ready <- struct{}{}:
	default:
	}
	return n, nil
}

// Close drops the queued packets; WritePackets fails afterwards and read returns 0.
func (e *linkEndpoint) Close() {
	e.mu.Lock()
	out := e.out
	e.out = nil
	e.closed = true
	e.mu.Unlock()
	for _, pb := range out {
		pb.DecRef()
	}
	select {
	case e.ready <- struct{}{}:
	default:
	}
}

// Capabilities reports RX checksum offload: Write's packets come from the local kernel with valid
// checksums (see Stack.Write), and the NIC takes a packet's RXChecksumValidated from this. GRO needs it
// too: it updates a coalesced packet's IP total length but not its header checksum.
func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// Attach implements stack.LinkEndpoint.
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
}

// IsAttached implements stack.LinkEndpoint.
func (e *linkEndpoint) IsAttached() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dispatcher != nil
}

func (e *linkEndpoint) MTU() uint32                             { return e.mtu }
func (e *linkEndpoint) SetMTU(uint32)                           {}
func (e *linkEndpoint) MaxHeaderLength() uint16                 { return 0 }
func (e *linkEndpoint) LinkAddress() tcpip.LinkAddress          { return "" }
func (e *linkEndpoint) SetLinkAddress(tcpip.LinkAddress)        {}
func (e *linkEndpoint) Wait()                                   {}
func (e *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }
func (e *linkEndpoint) AddHeader(*stack.PacketBuffer)           {}
func (e *linkEndpoint) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (e *linkEndpoint) SetOnCloseAction(func())                 {}
