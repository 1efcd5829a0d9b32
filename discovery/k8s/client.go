package k8s

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/flowcontrol"
)

// Client is the package's access to the API server: list, watch and JSON merge patch of the few
// resources it uses. New and PublishRelay build one from a kubeconfig file, a REST configuration
// or the in-cluster configuration (Config.Client and RelayConfig.Client replace it in tests).
//
// The package does without client-go's clientset and informer factory on purpose: they register
// every API group's types and clients, and cost each agent over 10 MB of memory.
type Client interface {
	// List returns the objects of res in namespace ("" for all namespaces, and for Nodes) as the
	// resource's list type: *corev1.ServiceList, *discoveryv1.EndpointSliceList,
	// *corev1.NodeList or *corev1.SecretList.
	List(ctx context.Context, res Resource, namespace string, opts metav1.ListOptions) (runtime.Object, error)
	// Watch watches the objects of res in namespace ("" for all namespaces, and for Nodes); the
	// events carry the resource's object type (*corev1.Service, ...).
	Watch(ctx context.Context, res Resource, namespace string, opts metav1.ListOptions) (watch.Interface, error)
	// MergePatch applies the JSON merge patch to the object name of res in namespace ("" for
	// Nodes). The error of a request the API server refused is an API status error (see
	// k8s.io/apimachinery/pkg/api/errors).
	MergePatch(ctx context.Context, res Resource, namespace, name string, patch []byte, opts metav1.PatchOptions) error
}

// Resource is a resource of the API that the package reads or writes, by its plural name.
type Resource string

// The resources a Client serves.
const (
	ResourceServices       Resource = "services"       // core/v1, namespaced
	ResourceEndpointSlices Resource = "endpointslices" // discovery.k8s.io/v1, namespaced
	ResourceNodes          Resource = "nodes"          // core/v1, cluster-scoped
	ResourceSecrets        Resource = "secrets"        // core/v1, namespaced
)

// object returns a new, empty object of res, the type an informer of res holds; nil for an
// unknown resource.
func (res Resource) object() runtime.Object {
	switch res {
	case ResourceServices:
		return &corev1.Service{}
	case ResourceEndpointSlices:
		return &discoveryv1.EndpointSlice{}
	case ResourceNodes:
		return &corev1.Node{}
	case ResourceSecrets:
		return &corev1.Secret{}
	}
	return nil
}

// list returns a new, empty list object of res; nil for an unknown resource.
func (res Resource) list() runtime.Object {
	switch res {
	case ResourceServices:
		return &corev1.ServiceList{}
	case ResourceEndpointSlices:
		return &discoveryv1.EndpointSliceList{}
	case ResourceNodes:
		return &corev1.NodeList{}
	case ResourceSecrets:
		return &corev1.SecretList{}
	}
	return nil
}

// scheme knows the types of the resources above, their lists, and what metav1 adds to each group
// version (Status, WatchEvent, ListOptions, PatchOptions...): all that codecs decode
// and parameterCodec encodes.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	s.AddKnownTypes(corev1.SchemeGroupVersion,
		&corev1.Service{}, &corev1.ServiceList{},
		&corev1.Node{}, &corev1.NodeList{},
		&corev1.Secret{}, &corev1.SecretList{})
	metav1.AddToGroupVersion(s, corev1.SchemeGroupVersion)
	s.AddKnownTypes(discoveryv1.SchemeGroupVersion, &discoveryv1.EndpointSlice{}, &discoveryv1.EndpointSliceList{})
	metav1.AddToGroupVersion(s, discoveryv1.SchemeGroupVersion)
	return s
}()

var (
	// codecs decode what the API server sends (JSON or protobuf) without conversion, as the
	// generated clients do.
	codecs = serializer.NewCodecFactory(scheme).WithoutConversion()
	// parameterCodec writes ListOptions and PatchOptions as query parameters.
	parameterCodec = runtime.NewParameterCodec(scheme)
)

// restClient is the Client over the API server's REST API: one REST client for /api/v1 and one
// for /apis/discovery.k8s.io/v1, sharing one HTTP client. Like client-go's generated clients, it
// asks for protobuf, falling back to JSON, unless the configuration sets a content type.
type restClient struct {
	core, discovery *rest.RESTClient
}

var _ Client = (*restClient)(nil)

// newRESTClient returns the Client for config, which it does not modify. It does not contact the
// API server.
func newRESTClient(config *rest.Config) (*restClient, error) {
	cfg := *config
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	httpClient, err := rest.HTTPClientFor(&cfg)
	if err != nil {
		return nil, err
	}
	// As client-go's clientset: one rate limiter for both groups when the configuration sets a
	// QPS, else each REST client makes its own with client-go's defaults.
	if cfg.RateLimiter == nil && cfg.QPS > 0 {
		if cfg.Burst <= 0 {
			return nil, fmt.Errorf("burst is required to be greater than 0 when RateLimiter is not set and QPS is set to greater than 0")
		}
		cfg.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(cfg.QPS, cfg.Burst)
	}
	group := func(apiPath string, gv schema.GroupVersion) (*rest.RESTClient, error) {
		c := cfg
		c.APIPath, c.GroupVersion, c.NegotiatedSerializer = apiPath, &gv, codecs
		return rest.RESTClientForConfigAndClient(&c, httpClient)
	}
	core, err := group("/api", corev1.SchemeGroupVersion)
	if err != nil {
		return nil, err
	}
	disc, err := group("/apis", discoveryv1.SchemeGroupVersion)
	if err != nil {
		return nil, err
	}
	return &restClient{core: core, discovery: disc}, nil
}

// request starts a request of verb for res in namespace, with opts as query parameters.
func (c *restClient) request(verb string, res Resource, namespace string, opts runtime.Object) (*rest.Request, error) {
	rc := c.core
	switch res {
	case ResourceServices, ResourceNodes, ResourceSecrets:
	case ResourceEndpointSlices:
		rc = c.discovery
	default:
		return nil, fmt.Errorf("resource %q is not one the Kubernetes catalog uses", res)
	}
	return rc.Verb(verb).
		UseProtobufAsDefault().
		NamespaceIfScoped(namespace, namespace != "").
		Resource(string(res)).
		VersionedParams(opts, parameterCodec), nil
}

func (c *restClient) List(ctx context.Context, res Resource, namespace string, opts metav1.ListOptions) (runtime.Object, error) {
	req, err := c.request("GET", res, namespace, &opts)
	if err != nil {
		return nil, err
	}
	list := res.list()
	if err := req.Timeout(timeout(opts)).Do(ctx).Into(list); err != nil {
		return nil, err
	}
	return list, nil
}

func (c *restClient) Watch(ctx context.Context, res Resource, namespace string, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	req, err := c.request("GET", res, namespace, &opts)
	if err != nil {
		return nil, err
	}
	return req.Timeout(timeout(opts)).Watch(ctx)
}

func (c *restClient) MergePatch(ctx context.Context, res Resource, namespace, name string, patch []byte, opts metav1.PatchOptions) error {
	req, err := c.request("PATCH", res, namespace, &opts)
	if err != nil {
		return err
	}
	return req.SetHeader("Content-Type", string(types.MergePatchType)).Name(name).Body(patch).Do(ctx).Error()
}

// timeout is the request timeout that opts ask for, as client-go's generated clients set it.
func timeout(opts metav1.ListOptions) time.Duration {
	if opts.TimeoutSeconds == nil {
		return 0
	}
	return time.Duration(*opts.TimeoutSeconds) * time.Second
}
