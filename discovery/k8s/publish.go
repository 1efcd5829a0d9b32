package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/edgewire/edgewire/discovery"
)

// fieldManager names edgewire's writes in the objects' managedFields.
const fieldManager = "edgewire"

// Publish implements discovery.Publisher: it records self as annotations for this node's Node
// (discovery.AnnotationWireGuardKey, AnnotationOverlayAddress and AnnotationEndpoints,
// comma-separated ip:port with IPv6 as [addr]:port) and returns at once. While Run runs, they are
// applied with a JSON merge patch of the Node's metadata.annotations (the agent needs the verb
// patch on nodes), retried with back-off from 500 ms to 30 s while that fails, and applied again
// whenever the Node the informer sees lacks them or has other values. Publish may be called before
// Run and while it runs; the last call wins. A self that other nodes could not read (a bad key or
// endpoint) is logged and not recorded, and so is any call when Config.NodeName is empty.
func (s *Source) Publish(self discovery.Self) {
	if s.nodeName == "" {
		s.log.Error("cannot publish this node's WireGuard key and endpoints: no node name configured (set --node-name)")
		return
	}
	want, err := selfAnnotations(self)
	if err != nil {
		s.log.Error("not publishing this node's annotations", "node", s.nodeName, "err", err)
		return
	}
	s.mu.Lock()
	s.desired = want
	s.mu.Unlock()
	nudge(s.pubKick)
}

// selfAnnotations returns the Node annotations for self, checked to pass the validation other
// nodes apply to them (convertNode). Duplicate endpoints are dropped.
func selfAnnotations(self discovery.Self) (map[string]string, error) {
	if _, ok := discovery.ParseWireGuardKey(self.WireGuardKey); !ok {
		return nil, fmt.Errorf("%q is not a WireGuard public key (32 bytes in base64)", self.WireGuardKey)
	}
	var eps []string
	for _, ap := range self.Endpoints {
		if s := ap.String(); !slices.Contains(eps, s) {
			eps = append(eps, s)
		}
	}
	joined := strings.Join(eps, ",")
	if _, err := discovery.ParseEndpoints(joined); err != nil {
		return nil, fmt.Errorf("endpoints: %w", err)
	}
	overlay := ""
	if self.Overlay.IsValid() {
		overlay = self.Overlay.String()
	}
	return map[string]string{
		discovery.AnnotationWireGuardKey:   self.WireGuardKey,
		discovery.AnnotationOverlayAddress: overlay,
		discovery.AnnotationEndpoints:      joined,
	}, nil
}

// wanted returns the annotations Publish recorded, nil before the first call. The map is never
// modified after Publish stored it.
func (s *Source) wanted() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.desired
}

// checkOwnNode wakes the publisher when obj is this node's Node and lacks the recorded annotations
// (someone removed or changed them). It runs in the Node informer's event handler.
func (s *Source) checkOwnNode(obj any) {
	n, ok := obj.(*corev1.Node)
	if !ok || n.Name != s.nodeName {
		return
	}
	if want := s.wanted(); want != nil && !hasAll(n.Annotations, want) {
		nudge(s.pubKick)
	}
}

// hasAll reports whether have holds every key of want with the same value.
func hasAll(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}

// publishLoop applies the recorded annotations whenever pubKick is woken and the Node in the
// informer's cache lacks them, retrying failed patches with back-off (a wake-up during the
// back-off waits for it). It returns when ctx is done.
func (s *Source) publishLoop(ctx context.Context, nodes cache.Store) {
	delay := s.retryMin
	retry := time.NewTimer(delay)
	retry.Stop()
	defer retry.Stop()
	backingOff := false
	for {
		kick := s.pubKick
		if backingOff {
			kick = nil
		}
		select {
		case <-ctx.Done():
			return
		case <-kick:
		case <-retry.C:
			backingOff = false
		}
		want := s.wanted()
		if want == nil {
			continue
		}
		if n, ok := getObject[*corev1.Node](nodes, s.nodeName); ok && hasAll(n.Annotations, want) {
			delay = s.retryMin
			continue
		}
		err := s.patchNode(ctx, want)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			s.log.Info("published this node's WireGuard key and endpoints on its Node", "node", s.nodeName,
				"endpoints", want[discovery.AnnotationEndpoints])
			delay = s.retryMin
			continue
		}
		s.log.Error("cannot publish this node's WireGuard key and endpoints on its Node", "node", s.nodeName,
			"err", err, "fix", nodePatchHint(err, s.nodeName), "retry_in", delay)
		retry.Reset(delay)
		backingOff = true
		delay = min(2*delay, retryMax)
	}
}

// patchNode sets the annotations want on this node's Node with a JSON merge patch.
func (s *Source) patchNode(ctx context.Context, want map[string]string) error {
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": want}})
	if err != nil {
		return fmt.Errorf("patch Node %s: %w", s.nodeName, err)
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	err = s.client.MergePatch(ctx, ResourceNodes, "", s.nodeName, body, metav1.PatchOptions{FieldManager: fieldManager})
	if err != nil {
		return fmt.Errorf("patch Node %s: %w", s.nodeName, err)
	}
	return nil
}

// nodePatchHint says how to fix a failed patch of this node's Node.
func nodePatchHint(err error, node string) string {
	switch {
	case apierrors.IsForbidden(err):
		return "the agent's ServiceAccount may not patch Nodes: its ClusterRole (deploy/) needs the verb patch on nodes"
	case apierrors.IsNotFound(err):
		return fmt.Sprintf("Node %s not found: the node name (--node-name) must be this node's Kubernetes name, the Pod's spec.nodeName", node)
	case apierrors.IsUnauthorized(err):
		return "the API server rejected the agent's credentials: check its ServiceAccount token or kubeconfig"
	}
	return "check that the API server is reachable"
}
